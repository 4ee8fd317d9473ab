"""The README's curation walk-through, run on the input files it names (``docs/examples/curation/``): each
command's printed lines must be the ones the README shows under it (``# `` lines, wrapped lines joined), so the
example a new user copies works and says what it prints."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from shiq_data.cli import main

REPO = Path(__file__).resolve().parents[1]
FIRST = "shiq-data build jsonl rows.jsonl --tokenizer gpt2 --out buffers/demo\nshiq-data append buffers/demo"


def readme_block() -> list[tuple[str, str]]:
    """``(command, the output the README shows for it)`` of the curation walk-through, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(FIRST)
    block = text[start : text.index("```", start)]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("#"):
            steps[-1][1].append(line[1:].strip())
        elif line.strip():
            steps.append((re.split(r"\s{2,}#", line)[0].strip(), []))  # (a comment after the command)
    return [(cmd, " ".join(out)) for cmd, out in steps]


def test_the_curation_walk_through_prints_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    shutil.copytree(REPO / "docs" / "examples" / "curation", tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    steps = readme_block()
    assert len(steps) == 9 and steps[-1][0].startswith("shiq-data decontaminate")
    for cmd, shown in steps:
        argv = shlex.split(cmd)
        assert argv[0] == "shiq-data", cmd
        quiet = (
            ["--no-progress"]
            if argv[1] in ("build", "append", "filter", "dedup", "split", "mix", "decontaminate")
            else []
        )
        assert main([*argv[1:], *quiet]) == 0, cmd
        out = capsys.readouterr()
        printed = " ".join(" ".join(line.split()) for line in (out.out + out.err).splitlines() if line.strip())
        if shown:  # (the README shows no output for build and append)
            assert printed == " ".join(shown.split()), (cmd, printed, shown)
    assert sum(bool(shown) for _, shown in steps) == 7
