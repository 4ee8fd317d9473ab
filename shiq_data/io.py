"""Low-level file helpers every layer shares: atomic writes, JSON and JSON-lines reading, input-row errors and
their messages.

A file is written atomically by :func:`atomic_write`: the bytes land in a temporary file beside the target,
are flushed to disk, and the file is renamed over the target (the rename is flushed too), so a killed
process or a power loss leaves either the old file or the new one under the final name, never a partial
one. A folder is made whole the same way (:func:`atomic_dir`), and files that belong together are renamed
in together (:func:`atomic_write_texts`, :func:`files_together`). Nothing here imports torch or pyarrow.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


class RowError(ValueError):
    """A bad input row. ``file``, ``row`` (index or line number) and ``field`` say where; the message names all three."""

    def __init__(self, file, row, field: str, problem: str, *, row_label: str = "row"):
        self.file, self.row, self.field, self.problem, self.row_label = str(file), row, field, problem, row_label
        super().__init__(f"{self.file}: {row_label} {row}: field '{field}': {problem}")

    def __reduce__(self):  # pickled whole (a worker process of a parallel build raises it in the main process)
        return _row_error, (type(self), self.file, self.row, self.field, self.problem, self.row_label), self.__dict__


def _row_error(cls, file, row, field, problem, row_label):
    return cls(file, row, field, problem, row_label=row_label)


# C0, DEL and C1: what a terminal may act on rather than show; and the direction marks, embeddings, overrides and
# isolates (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), which reorder what a terminal shows after them
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, keep: str = "") -> str:
    """``text`` with its control characters (C0, DEL, C1; but those in ``keep``, such as ``"\\n\\t"``) written
    as ``\\x1b``, and its bidirectional marks, embeddings, overrides and isolates as ``\\u202e``: data printed
    to a terminal must not move its cursor, retitle it, hide what follows or show it reordered."""
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else _escape(m[0]), str(text))


def _escape(c: str) -> str:
    """The character ``c`` as Python writes it in a string: ``\\x1b``, ``\\u202e``."""
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def one_line(e: BaseException | str, limit: int | None = None) -> str:
    """The message of ``e`` on one line (its line breaks and runs of spaces collapsed), cut to ``limit``
    characters: how a library's error is quoted inside one of ours."""
    return " ".join(str(e).split())[:limit]


def type_name(value) -> str:
    """What an input value is, for a message: ``null`` for JSON's null (Python's None), else its type's name."""
    return "null" if value is None else type(value).__name__


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 of the files' bytes read one after the other, in the order given (one file: its own SHA-256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


CHECKSUM_SUFFIX = ".sha256"


def checksum_file(path: Path) -> Path:
    """Where the SHA-256 of ``path`` is kept: ``path.sha256``, in ``sha256sum`` format."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: Path, digest: str) -> None:
    """``path.sha256`` holding ``digest``, the SHA-256 of ``path``, in ``sha256sum`` format (``sha256sum -c`` reads
    it; :func:`check_sha256` checks it), written atomically."""
    atomic_write(checksum_file(path), lambda p: p.write_text(f"{digest}  {path.name}\n"))


def check_sha256(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless it matches the SHA-256 in ``path.sha256``: a file cut short,
    damaged on disk or edited is refused before it is read, as is one without a checksum, and either file being
    a symbolic link (it could name any file outside the folder)."""
    sums = checksum_file(path)
    for p in (path, sums):  # a link would let the folder name any file, its checksum included
        if p.is_symlink():
            raise ValueError(f"{p} is a link; a checkpoint's files must be plain files inside {path.parent}")
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete")
    try:
        recorded = sums.read_text(encoding="utf-8").split()[0].lower()  # sha256sum -c reads either case
    except (FileNotFoundError, IndexError, UnicodeDecodeError):
        raise ValueError(
            f"{sums} is missing or empty: {path.name} has no checksum to be checked against (a partial copy of "
            f"its folder, or a file written before its checksum was kept: if the file is known to be good, "
            f"'sha256sum {path.name} > {sums.name}' in its folder adds one)"
        ) from None
    if sha256_files([path]) != recorded:
        raise ValueError(f"{path}: sha256 differs from {sums.name}'s (the file changed or is corrupt)")


def check_sha256_if_kept(path: Path) -> None:
    """:func:`check_sha256` where ``path.sha256`` is there (or a link in its place); a file written before its
    checksum was kept beside it (a checkpoint's ``meta.json`` of an earlier release) is read as it is."""
    sums = checksum_file(path)
    if sums.exists() or sums.is_symlink():
        check_sha256(path)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (safetensors, else PyTorch ``.bin``), in name order."""
    return sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))


def check_weight_map(folder: Path) -> None:
    """Refuse a model folder whose shard index (``*.index.json``, which transformers follows to load a model
    saved in several files) names a weight file outside the folder (``../other/model.safetensors``: it would be
    read, and no checksum of the folder's files covers it) or one it does not hold: ``ValueError`` naming the
    index and the entry."""
    for index in sorted(Path(folder).glob("*.index.json")):
        try:
            weight_map = json_loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, RecursionError, AttributeError) as e:  # (JSONDecodeError, UnicodeDecodeError: ValueErrors)
            raise ValueError(f"{index}: not a shard index (a JSON object with a 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map' must be an object of weight name: file name")
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise ValueError(
                    f"{index}: weight_map[{name!r}] is {file!r}: a file of this folder is named by its name alone"
                )
            if not (index.parent / file).is_file():
                raise ValueError(f"{index}: weight_map[{name!r}] names {file}, which the folder does not hold")


STEP_FOLDER = re.compile(r"step_(\d+)")  # a checkpoint step folder's name (fullmatch), its step the group


def check_step_folder(meta_path: Path, step) -> None:
    """Refuse a checkpoint's ``meta.json`` whose ``step`` is not the one its folder's name (``step_N``, the name
    as given, not a link target's) says: ``ValueError`` naming the file (export and evaluation read it alike)."""
    named = STEP_FOLDER.fullmatch(Path(os.path.abspath(Path(meta_path).parent)).name)
    if named and int(named[1]) != step:
        raise ValueError(
            f"{meta_path}: field 'step' is {step} in the folder of step {int(named[1])}: the checkpoint is damaged"
        )


def step_folders(directory) -> list[Path]:
    """The step folders (``step_N``) of the checkpoints folder ``directory``, in step order. A link of such a name
    is refused: a run's steps are its own folders (a restart removes what a killed save left in them, which
    through a link would remove files outside the run)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if STEP_FOLDER.fullmatch(p.name):
            if p.is_symlink():
                raise ValueError(
                    f"{p} is a symbolic link, not a step folder of {directory}: a run's checkpoints are its own "
                    "folders (copy the step in, or remove the link)"
                )
            if p.is_dir():
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def recorded_folder(record_path: Path, what: str, path: str, option: str) -> str:
    """The refusal of a folder ``path`` that the file ``record_path`` names as ``what`` for a command to load by
    itself: a path read from a file is not followed out of that file's folder; the command line names it."""
    return (
        f"{record_path}: the {what} is the folder {path} as recorded there; a path read from a file is not "
        f"followed: give it with {option} {shlex.quote(path)}"
    )


def recorded_sha256(
    record_path: Path, recorded, names: list[str] | None = None, missing: str | None = None
) -> dict[str, str]:
    """The ``sha256`` field of the record ``shiq-train export`` writes beside a model's weights
    (``record_path``): ``{file name: digest}`` for exactly the folder's :func:`weight_files` (or the file
    names ``names``, for another record of files beside it), each digest 64 hex digits (returned in lower
    case, as :func:`sha256_files` gives them); ``ValueError`` naming the file and field otherwise, a missing
    field too (files that cannot be checked are not read as the record's), then ``missing``: what to do."""
    if recorded is None:
        if missing is None:
            missing = (
                "export the run again (shiq-train export), or remove "
                f"{Path(record_path).name} to read the folder as any Hugging Face model"
            )
        what = "the weights" if names is None else ", ".join(names)
        raise ValueError(f"{record_path}: field 'sha256' is missing, so {what} cannot be checked: {missing}")
    files = "the folder's weight files" if names is None else "the files"
    if names is None:
        names = [f.name for f in weight_files(Path(record_path).parent)]
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(names):
        got = sorted(recorded) if isinstance(recorded, dict) else recorded
        raise ValueError(
            f"{record_path}: field 'sha256': must give the SHA-256 of exactly {files} {names}, got {got!r}"
        )
    if not all(
        isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdefABCDEF" for c in d) for d in recorded.values()
    ):
        raise ValueError(f"{record_path}: field 'sha256': each value must be a SHA-256 in hex (64 digits)")
    return {name: d.lower() for name, d in recorded.items()}


def read_json_file(path: str | os.PathLike, error: type[Exception] = ValueError, hint: str = "", *, constants=False):
    """The JSON value of the file ``path``, or ``error`` naming it (then ``hint``) when it is not valid JSON or
    not UTF-8, and also when it holds what ``json`` refuses without a ``JSONDecodeError``: a number of more
    than 4,300 digits (a ``ValueError``) or nesting too deep for Python (a ``RecursionError``). A key given twice
    in one object is refused naming it (JSON keeps the last, silently: a manifest's second ``"tokenizer"`` or a
    shard's second ``"sha256"`` would win unseen), and so are ``NaN``, ``Infinity`` and ``-Infinity``, which
    Python's ``json`` reads by default but are not JSON (other readers refuse the file; this project writes
    null for an undefined number), unless ``constants`` (a file another program wrote so: transformers 4 wrote an
    infinite float of a config.json as ``Infinity``)."""
    text = None
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=None if constants else _no_constant)
    except DuplicateKey as e:
        raise error(
            f"{path}: key {e.key!r} given twice in one JSON object (which would win is a guess){hint}"
        ) from None
    except NotJsonConstant as e:
        raise error(f"{path}: not valid JSON ({e.name} is not a JSON number: {constant_place(text)}){hint}") from None
    except (ValueError, RecursionError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise error(f"{path}: not valid JSON ({e}){hint}") from None


def text_place(text: str, offset: int) -> tuple[int, int]:
    """``(line, column)`` of the character at ``offset`` of ``text``, both 1-based (as ``json`` and PyYAML's
    marks name a place)."""
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)


def constant_place(text: str) -> str:
    """``line L column C`` (1-based, as ``json`` names a place) of the first ``NaN``, ``Infinity`` or ``-Infinity``
    of the JSON text ``text`` outside its strings."""
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)', text):
        if m.group(1):
            return "line {} column {}".format(*text_place(text, m.start()))
    return "place unknown"


class NotJsonConstant(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity`` (``name``) met by :func:`read_json_file`."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_constant(name: str):
    raise NotJsonConstant(name)


def non_finite_as_null(obj):
    """``obj`` (JSON-like: dicts, lists, tuples) with every NaN or infinite float as None, for a file that must
    be standard JSON (:func:`read_json_file` refuses ``NaN``/``Infinity``) but may hold an undefined number
    (a diverged loss)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: non_finite_as_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [non_finite_as_null(v) for v in obj]
    return obj


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, flush it, rename it to ``path`` and
    flush the rename. The parent folder is created if missing; on any failure the temporary file is
    removed and ``path`` is untouched. ``mode``: the file's permissions (results are meant to be shared)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; the ones this call created, outermost first (one another
    process made meanwhile is not among them)."""
    missing = [p for p in reversed(Path(path).parents) if not p.exists()]
    created = []
    try:
        for p in missing:
            try:
                p.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            created.append(p)
    except BaseException:
        remove_created_dirs(created)
        raise
    return created


def remove_created_dirs(created: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, innermost first, as long as they are empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: someone else put something there, and so into its parents
            break


def atomic_write_texts(files: dict) -> list[Path]:
    """Write several files that belong together (``{path: text}``, UTF-8), in any folders: each is first written
    in full to a temporary file beside it, and only when all are written are they renamed into place, so a
    failure on one (a folder that cannot be made, a full disk) leaves every path as it was and no temporary
    file behind. Returns the paths."""
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []  # folders made here, removed again (if still empty) when a later file fails
    try:
        for path, text in files.items():
            path = Path(path)
            try:
                made += make_parents(path)
                fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            except OSError as e:  # a parent that is a file, a folder without write permission
                raise ValueError(
                    f"{path}: cannot be written ({e.strerror}: {e.filename}); nothing was written"
                ) from None
            staged.append((Path(tmp_name), path))
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)
        for tmp, path in staged:
            os.replace(tmp, path)
        for folder in {path.parent for _, path in staged}:
            fsync_dir(folder)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        remove_created_dirs(made)
        raise
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return [path for _, path in staged]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> Path:
    """Write ``obj`` as indented JSON with a final newline, atomically. A NaN or infinite number is refused
    (``ValueError`` naming the file and the field): ``json`` would write ``NaN``/``Infinity``, which standard
    JSON cannot hold and other readers refuse; a caller with an undefined value writes null for it."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        field = non_finite_field(obj)
        raise ValueError(f"{path}: field {field!r}: not a finite number, which standard JSON cannot hold") from None
    return atomic_write_text(path, text + "\n")


def non_finite_field(value, field: str = "") -> str | None:
    """The path (``rows[0].loss``) of the first NaN or infinite float in the JSON value ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else field or "*"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        name = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else str(key)
        found = non_finite_field(item, name)
        if found is not None:
            return found
    return None


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically (the records are streamed to the temporary file)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    return atomic_write(path, write)


class _GzipReader(gzip.GzipFile):
    """A gzip stream read from an open file, which it closes with itself (``GzipFile`` leaves it open)."""

    def close(self) -> None:
        raw = self.fileobj
        try:
            super().close()
        finally:
            if raw is not None:
                raw.close()


class _Prefixed(io.RawIOBase):
    """The bytes ``head`` read off the open file ``rest`` already, then the rest of it: a pipe's first bytes,
    read to look at them, put back in front (a pipe cannot seek back to them)."""

    def __init__(self, head: bytes, rest):
        super().__init__()
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        return self.rest.readinto(b)

    def close(self) -> None:
        try:
            self.rest.close()
        finally:
            super().close()


def open_binary(path: str | os.PathLike):
    """Open ``path`` for reading bytes, decompressing on the fly when its name ends in ``.gz`` (in any case) or
    its first two bytes are gzip's (which no text or JSON file starts with). The file is opened once, so a pipe
    (``<(zcat rows.jsonl.gz)``, a FIFO) is read whole: its first two bytes are read (however few its writer
    wrote at first) and put back in front of the rest; a file's are read and sought back over."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    f = open(path, "rb")
    try:
        head = f.read(2)  # (a BufferedReader's read(2) waits for two bytes or the end)
        if f.seekable():
            f.seek(0)
        else:
            f = io.BufferedReader(_Prefixed(head, f))
        gzipped = path.suffix.lower() == ".gz" or head == b"\x1f\x8b"
    except BaseException:
        f.close()
        raise
    return _GzipReader(fileobj=f, mode="rb") if gzipped else f


LINE_PIECE = 1 << 20  # bytes read at a time by text_lines (a file of CR line ends is not read whole)


def text_lines(f) -> Iterator[bytes]:
    """The lines of the binary file ``f``, each with its end: ``\n``, ``\r\n`` or a lone ``\r`` (an old Mac's
    line end; Python's universal newlines and most tools take it as one), the last line with none if the file
    ends without one. No other character ends a line (bytes' ``splitlines``: not U+2028, which JSON may hold
    inside a string). Read ``LINE_PIECE`` bytes at a time (what a pipe has, up to that, with ``read1``) and
    split in C, about as fast as iterating the file: a line longer than a piece is joined from its pieces once,
    a file of ``\r`` line ends is not read whole as one line, and a ``\r\n`` cut between two pieces is still one
    line end."""
    read = getattr(f, "read1", f.read)
    held: list[bytes] = []  # the start of a line not ended yet, or a line ended by a \r that a \n may follow
    while chunk := read(LINE_PIECE):
        lines = chunk.splitlines(keepends=True)
        if held:
            if not held[-1].endswith(b"\r") and len(lines) == 1 and not chunk.endswith((b"\n", b"\r")):
                held.append(chunk)  # the middle of a line longer than a piece
                continue
            start = b"".join(held)
            held = []
            if start.endswith(b"\r") and lines[0] != b"\n":  # ended by its \r alone
                yield start
            else:
                lines[0] = start + lines[0]
        if not lines[-1].endswith(b"\n"):  # no end yet, or a \r the next piece's \n may complete
            held.append(lines.pop())
        yield from lines
    if held:
        yield b"".join(held)


def utf8_lines(f, path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of the binary file ``f`` (1-based numbers; a line ends at ``\n``,
    ``\r\n`` or ``\r``, :func:`text_lines`); a line that is not valid UTF-8 raises :class:`RowError` naming
    ``path``, the line and the offending byte. A byte-order mark opening the file (Windows tools write one) is
    not part of its first line."""
    for line_no, raw in enumerate(text_lines(f), 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(
                path,
                line_no,
                "*",
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                row_label="line",
            ) from None


def lone_surrogate(text: str) -> int | None:
    """The index of the first character of ``text`` that cannot be encoded as UTF-8 (a lone surrogate such
    as JSON's ``"\\ud800"``), or None. Serves both the JSON records read here and the rows of the schema."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def unencodable_field(value, field: str = "") -> str | None:
    """The path (``completion[0].content``) of the first string in the JSON value ``value`` (keys included)
    that cannot be encoded as UTF-8 (see :func:`lone_surrogate`), or None."""
    if isinstance(value, str):
        return None if lone_surrogate(value) is None else field or "*"
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            if unencodable_field(key) is not None:
                return name.encode("utf-8", "backslashreplace").decode("utf-8")
            found = unencodable_field(item, name)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unencodable_field(item, f"{field}[{i}]")
            if found is not None:
                return found
    return None


class DuplicateKey(ValueError):
    """A key given twice in one JSON object (:func:`no_duplicate_keys`)."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} given twice in one JSON object (which would win is a guess)")
        self.key = key


def json_loads(text: str):
    """``json.loads(text)``, a key given twice in one object refused (:class:`DuplicateKey`, a ``ValueError``)."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys)


def no_duplicate_keys(pairs: list) -> dict:
    """``json.loads``' ``object_pairs_hook``: the object, or :class:`DuplicateKey` for a key given twice (JSON
    itself keeps the last, silently: ``{"reward": 1, "reward": -1}`` read as -1)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def readable_lines(lines: Iterator, path: Path) -> Iterator:
    """``lines``, with a file that cannot be read to its end (a cut or damaged ``.gz``, a read error) named
    as a ``ValueError``: gzip's and zlib's own errors name no file."""
    n = 0
    try:
        for n, line in lines:
            yield n, line
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: cannot be read {read_to(n)} ({type(e).__name__}: {e})") from None


def read_to(n: int) -> str:
    """Where a file that cannot be read to its end stops: ``past line N`` (lines count from 1), ``from its
    start`` when not one line could be read."""
    return f"past line {n}" if n else "from its start"


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` of each non-blank line of a JSON-lines file, plain or ``.gz`` (1-based
    numbers). Bad UTF-8, bad JSON, a line that is not a JSON object or a string that is not Unicode text
    (a lone surrogate escape, ``"\\ud800"``) raises :class:`RowError` naming the file, line and field."""
    path = Path(path)
    with open_binary(path) as f:
        for n, line in readable_lines(utf8_lines(f, path), path):
            if not line.strip():
                continue
            try:  # (without its line end, a line cut inside a string is "Unterminated string", not a control character)
                obj = json.loads(line.rstrip("\r\n"), object_pairs_hook=no_duplicate_keys)
            except DuplicateKey as e:
                raise RowError(
                    path, n, e.key, "given twice in one JSON object (which would win is a guess)", row_label="line"
                ) from None
            except json.JSONDecodeError as e:
                raise RowError(
                    path, n, "*", f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})", row_label="line"
                ) from None
            except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
                raise RowError(path, n, "*", f"not valid JSON ({e})", row_label="line") from None
            if not isinstance(obj, dict):
                raise RowError(path, n, "*", f"expected a JSON object, got {type_name(obj)}", row_label="line")
            if "\\u" in line:  # only an escape can make a lone surrogate (the line itself is valid UTF-8)
                field = unencodable_field(obj)
                if field is not None:
                    raise RowError(path, n, field, "not Unicode text (a lone surrogate \\u escape)", row_label="line")
            yield n, obj


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, waiting: str | None = None, *, wait: bool = True, holder: str = "another process"
) -> Iterator[str | None]:
    """Hold an exclusive advisory lock on the file ``path`` (made if absent; its folder must exist) for the
    ``with`` block, waiting
    for any other holder (another process, or another open of it in this one). If it has to wait and
    ``waiting`` is given, that line goes to stderr first, so a silent wait is never mistaken for a hang.

    Yields None once the lock is held. With ``wait=False`` it does not wait: it yields why the lock could
    not be taken instead (``path`` is held by ``holder``, or cannot be opened), and the block runs unlocked.
    """
    path = Path(path)
    try:  # not through a link: the lock file is its folder's own (a link would make or open a file elsewhere)
        f = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a")
    except OSError as e:
        if e.errno == errno.ELOOP:
            e = OSError(e.errno, f"{path} is a symbolic link, not a lock file of its folder (remove the link)")
        if wait:
            raise e from None
        yield f"cannot open {path} ({e.strerror})"
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield f"{path} is held by {holder}"
                return
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield None
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the temporary folders in ``folder`` matching ``pattern`` (``.NAME.KIND-PID-suffix``, or
    ``.KIND-HOST-PID-suffix``, ``.NAME.HOST-PID-suffix``) whose process is gone (killed commands), judged by the
    pid in their name. A process of another machine sharing the folder looks gone from here: ``pattern`` names
    this host where that can be. :func:`sweep_held` judges by a lock instead, where there is one."""
    for p in folder.glob(pattern):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, OverflowError, PermissionError):  # (not a pid; beyond any pid)
            pass


def remove_stale_hostless(folder: Path, prefix: str) -> None:
    """Remove the temporary folders ``<prefix>PID-hex`` in ``folder`` that releases naming no host made, whose
    process is gone (:func:`remove_stale`, by pid; only for the output they were made for)."""
    for p in folder.glob(f"{glob.escape(prefix)}*"):
        if re.fullmatch(r"\d+-[0-9a-f]{8}", p.name[len(prefix) :]):
            remove_stale(folder, glob.escape(p.name))


HELD = ".held"  # the suffix of a temporary folder's lock file, beside it (:func:`held_dir`)


# flock's errors where a file system has no flock (some network file systems): the folder is judged by its pid
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def held_dir(parent: Path, stem: str, suffix: str = "") -> tuple[Path, int | None]:
    """Make the temporary folder ``parent/<stem>-<hex><suffix>`` (mode 700; ``stem`` ends with this host and this
    pid: ``.NAME.KIND-HOST-PID``) with its lock file ``<folder>.held`` beside it, made and locked (flock) first,
    so that :func:`sweep_held` never takes the folder of a live process for an orphan. Returns the folder and the
    lock's descriptor, which this process holds as long as it uses the folder and :func:`release_held` closes;
    the kernel releases the lock however the process ends. Where the file system has no flock (:data:`NO_FLOCK`)
    there is no lock file and the descriptor is None: the folder is judged by its pid.

    A sweep can meet the lock file between its making and its locking, take it for an orphan's and remove it:
    this call then holds a lock on a removed file, sees so (the name no longer leads to its file) and starts
    again under another name."""
    for _ in range(8):
        name = f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
        lock = parent / f"{name}{HELD}"
        fd: int | None = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.stat(lock)):
                raise FileNotFoundError(lock)
        except (BlockingIOError, FileNotFoundError):  # a sweep holds it, or removed it: another name
            os.close(fd)
            continue
        except (KeyboardInterrupt, SystemExit):  # (Ctrl-C, or SIGTERM's exception, here: no lock file is left)
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise
        except OSError as e:
            os.close(fd)
            lock.unlink(missing_ok=True)
            if e.errno not in NO_FLOCK:
                raise
            fd = None
        folder = parent / name
        try:
            folder.mkdir(mode=0o700)
        except BaseException:
            release_held(folder, fd)
            raise
        return folder, fd
    raise OSError(f"{parent}: a lock file for a temporary folder could not be kept from other processes' sweeps")


def release_held(folder: Path, fd: int | None) -> None:
    """Remove a :func:`held_dir` folder (if still there: it may have been renamed into place), then its lock,
    that one even when the removal is interrupted (a Ctrl-C during it left the lock file)."""
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if fd is not None:
            try:
                folder.with_name(f"{folder.name}{HELD}").unlink(missing_ok=True)
            finally:
                os.close(fd)


def sweep_held(parent: Path, pattern: str) -> None:
    """Remove the :func:`held_dir` folders in ``parent`` matching ``pattern`` (which names this host) whose process
    is gone: their lock can be taken. A pid alone could name a live process of another container of the same host
    name (another pid numbering). A folder without a lock file (made where there is no flock, or by an earlier
    release) is judged by its pid (:func:`remove_stale`); a lock file whose folder is gone is removed once free."""
    for p in sorted({*parent.glob(pattern), *parent.glob(f"{pattern}{HELD}")}):
        held = p.name.endswith(HELD)
        if held and p.with_name(p.name[: -len(HELD)]).exists():
            continue  # (judged with its folder)
        lock = p if held else p.with_name(f"{p.name}{HELD}")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            remove_stale(parent, glob.escape(p.name))
            continue
        except OSError:  # not ours to open: left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a process at work in it (or no flock here)
            os.close(fd)
            continue
        try:
            if not held:
                shutil.rmtree(p, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def this_host() -> str:
    """This machine's name as a temporary folder carries it beside the pid (a pid is this machine's: a folder
    may be shared with others), ``-`` made ``_`` so that the pid is the name's last but one ``-`` part."""
    return socket.gethostname().replace("-", "_")


@contextlib.contextmanager
def files_together(out: str | os.PathLike, owns: Iterable[str] = ()) -> Iterator[Path]:
    """Write a set of files that belong together (a table, its report and plots) into a staging folder
    inside ``out`` and move them into ``out`` only when the block ends without an error, each by an atomic
    rename: a failure half-way (a plot that cannot be drawn, a full disk) leaves the earlier set as it was,
    not new tables beside old plots (only an interruption within the final renames, a few system calls,
    could mix them). ``owns``: every name the set may hold; one the new set does not write is removed
    with the earlier set (an old plot the new data has none of). Yields the staging folder; ``out``'s other
    files are never touched, and ``out`` and the parents this call made are removed again on failure, as long
    as they are empty."""
    out = Path(out)
    made = make_parents(out / ".staged")  # ``out`` and its missing parents, outermost first
    host = this_host()
    stage, held = None, None  # (until the staging folder is made: nothing of it to remove)
    try:
        sweep_held(out, f".staged-{glob.escape(host)}-*.tmp")  # of a set whose process was killed while writing it
        stage, held = held_dir(out, f".staged-{host}-{os.getpid()}", ".tmp")
        yield stage
        written = sorted(stage.iterdir())
        for f in written:
            os.replace(f, out / f.name)
        for name in set(owns) - {f.name for f in written}:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        fsync_dir(out)
    except BaseException:
        if stage is not None:
            release_held(stage, held)
        stage = None
        remove_created_dirs(made)
        raise
    finally:
        if stage is not None:
            release_held(stage, held)


def unmade_folder(option: str, folder, e: OSError) -> ValueError:
    """The error of a folder the system will not make (no permission, a read-only file system) that the option
    ``option`` named: naming the option and the folder, not the temporary folder beside it the OS error names."""
    return ValueError(f"{option} {folder}: cannot make the folder ({e.strerror or e})")


def atomic_dir(
    folder: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = False, option: str | None = None
) -> Path:
    """Create ``folder`` by calling ``fill(tmp)`` on a temporary folder beside it and renaming that into place
    (mode 755), so the folder is either absent or complete. An existing ``folder`` is kept as it is (another
    process built it first) unless ``replace`` is true: then it is renamed aside just before the rename and
    removed after it (a crash between the two renames leaves it as ``.NAME.<hex>.old``, never lost), and a
    ``folder`` that is a link or a file is refused before any work. Parent folders it had to make are removed
    again on failure, if still empty. The temporary folder ``.NAME.HOST-PID-XXXX.tmp`` of a process killed while
    filling it is removed by the next call for the same folder on this machine (:func:`sweep_held`). ``option``
    (``--out``): the command-line option that named ``folder``, which a folder the system will not make (no
    permission, a read-only file system) is then refused naming, as a ValueError, rather than with the OS
    error naming the temporary folder."""
    folder = Path(folder)
    if replace and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
        raise ValueError(f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder to replace")
    if folder.is_dir() and not replace:
        return folder
    made: list[Path] = []
    try:
        made = make_parents(folder)
        host, name = this_host(), folder.name
        sweep_held(folder.parent, f".{glob.escape(name)}.{glob.escape(host)}-*.tmp")  # of a killed process's fill
        tmp, held = held_dir(folder.parent, f".{name}.{host}-{os.getpid()}", ".tmp")
    except BaseException as e:
        remove_created_dirs(made)
        if option is not None and isinstance(e, OSError):
            raise unmade_folder(option, folder, e) from None
        raise
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # shared like every result (held_dir makes it 0700)
        old = None
        if replace and folder.exists():  # set aside, not deleted, until the new one is in place
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.old")
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError as e:
            if old is not None:  # put back what is replaced, and say why the new one is not there
                try:
                    os.rename(old, folder)
                except OSError:
                    raise OSError(
                        e.errno,
                        f"{folder} could not be replaced ({e.strerror}), and the folder it replaces is kept "
                        f"as {old} (another process wrote {folder} meanwhile)",
                    ) from None
                raise
            if not folder.is_dir():  # else another process finished first; its copy is identical
                raise
        fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        release_held(tmp, held)
        held = None
        remove_created_dirs(made)
        raise
    finally:
        release_held(tmp, held)
    return folder


@contextlib.contextmanager
def progress_bar(enabled: bool, **kwargs) -> Iterator:
    """A tqdm bar (``kwargs`` are tqdm's; none drawn unless ``enabled``) for the caller to update by hand (not
    iterated: tqdm's iterator closes its bar, kept, as an error leaves the loop), closed on leaving the block:
    kept when the block ends, cleared when it raises, so the command's one-line error starts on a clean line
    rather than after a half-drawn or finished bar. Put the checks that may still refuse the input inside.
    ``TQDM_MININTERVAL`` (a log's, :func:`shiq_data.launch.progress_for_logs`, or the user's) wins over a
    ``mininterval`` given here: tqdm lets the argument win, and a log got a bar's line every second."""
    from tqdm import tqdm

    if os.environ.get("TQDM_MININTERVAL"):
        kwargs.pop("mininterval", None)
    bar = tqdm(disable=not enabled, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
