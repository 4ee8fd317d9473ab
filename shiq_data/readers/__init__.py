"""Input formats: one registry, name -> :class:`Format`, read by ``shiq-data build/append FORMAT INPUT``.

A format's reader is ``read(path, tokenizer, *, source=None, **options) -> Iterator[row dict]`` (rows as
in :mod:`shiq_data.schema`, without ``row_id`` or reference statistics). It reads local files only;
nothing is downloaded. Errors are :class:`shiq_data.io.RowError` naming the file, the line (or row)
and the field; every row carries its input location (:data:`shiq_data.schema.INPUT_KEY`), so a
problem the buffer's row check finds (a reward beyond float32) names the file, line and field too.

- ``jsonl``, ``parquet``, ``datasets`` — generic (prompt, completion, reward) records, TRL's
  preference shapes and exported buffer rows (:mod:`shiq_data.readers.generic`).
- ``hh`` — Anthropic HH-RLHF preference pairs (:mod:`shiq_data.readers.hh`).
- ``ultrafeedback`` — UltraFeedback, public or binarized (:mod:`shiq_data.readers.ultrafeedback`).
- ``multiturn`` — conversations with per-turn rewards (:mod:`shiq_data.readers.multiturn`).

The chat formats' rows carry a ``row_key`` ``"<file name>:<line>:<tag>"`` instead of a ``row_id``; the
buffer makes it the ``row_id`` ``b<k>-<row_key>`` for its k-th command
(:func:`shiq_data.buffer.write_buffer`), so appending another file of the same name does not clash.
The shared encoders are in :mod:`shiq_data.readers.encode`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shiq_data.io import iter_jsonl
from shiq_data.readers.generic import (
    datasets_records,
    jsonl_records,
    parquet_records,
    read_datasets,
    read_jsonl,
    read_parquet,
)
from shiq_data.readers.hh import read_hh
from shiq_data.readers.multiturn import read_multiturn
from shiq_data.readers.ultrafeedback import read_ultrafeedback


@dataclass(frozen=True)
class Format:
    """An input format: its reader and the keyword arguments the command line may give it.

    ``options`` can be set with ``--option KEY=VALUE``; those in ``booleans`` must be given ``true`` or
    ``false``. ``functions`` take a Python function, so only a Python caller can give them. ``source``
    (the rows' ``source`` column) comes from ``--source``.
    ``records(path)`` gives the input's ``(line or row, record)`` pairs, which ``read(path, tokenizer,
    records=chunk, **options)`` turns into rows (a parallel build, :mod:`shiq_data.readers.parallel`).
    """

    name: str
    read: Callable[..., Iterator[dict]]
    options: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    booleans: tuple[str, ...] = ()
    records: Callable[..., Iterator[tuple[int, dict]]] = iter_jsonl

    def check_options(self, options: dict) -> None:
        """Raise ``ValueError`` naming an option this format cannot take from the command line, and the
        ones it accepts."""
        if not self.options:
            if options:
                raise ValueError(f"format {self.name!r} takes no --option (got {sorted(options)})")
            return
        takes = f"format {self.name!r} accepts --option {', '.join(sorted(self.options))}"
        for name in options:
            if name in self.functions:
                raise ValueError(
                    f"--option {name}: takes a Python function, which cannot be given on the command line; {takes}"
                )
            if name not in self.options:
                raise ValueError(f"--option {name}: unknown option; {takes}")
            if name in self.booleans and not isinstance(options[name], bool):
                raise ValueError(f"--option {name}: must be true or false, got {options[name]!r:.40}")


FIELD_OPTIONS = ("prompt_field", "completion_field", "reward_field")  # which input fields hold them

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("jsonl", read_jsonl, FIELD_OPTIONS, records=jsonl_records),
        Format("parquet", read_parquet, FIELD_OPTIONS, records=parquet_records),
        Format("datasets", read_datasets, FIELD_OPTIONS, records=datasets_records),
        Format(
            "hh",
            read_hh,
            ("mode", "reward_model", "all_assistant_turns", "source"),
            ("reward_fn",),
            booleans=("all_assistant_turns",),
        ),
        Format("ultrafeedback", read_ultrafeedback, ("score_field", "source")),
        Format("multiturn", read_multiturn, ("source",)),
    )
}


def get_format(name: str) -> Format:
    """The registered format ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown input format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]
