"""Every option the README gives a console script (in its command blocks and in inline code) is one that
command's --help lists, so a command copied from the README is not refused for an option it does not take
(``shiq-eval --engine`` for ``shiq-eval run --engine``). shiq-train's Hydra command takes key=value, not options;
its argparse subcommands (ref-stats, export) are checked."""

from __future__ import annotations

import re
from pathlib import Path

from test_help_texts import SCRIPTS, help_text

REPO = Path(__file__).resolve().parents[1]
OPTION = r"(?<![\w-])(--[a-z][a-z0-9-]*)"


def readme_commands() -> list[tuple[int, str]]:
    """``(line, text)`` of every README code line and inline code span that runs a console script."""
    found, block = [], False
    for n, line in enumerate((REPO / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            block = not block
            continue
        spans = [re.split(r"\s{2,}#", line)[0]] if block else re.findall(r"`([^`]*)`", line)
        found += [(n, s) for s in spans if re.search(rf"\b({'|'.join(map(re.escape, SCRIPTS))})\b", s)]
    return found


def test_every_option_the_readme_gives_a_command_is_in_its_help(capsys, monkeypatch):
    helps: dict[tuple[str, ...], str | None] = {}

    def help_of(words: tuple[str, ...]) -> str | None:
        if words not in helps:
            if words == ("shiq-train",):
                helps[words] = None  # Hydra: key=value overrides only
            else:
                try:
                    helps[words] = help_text(words[0], list(words[1:]), capsys, monkeypatch)
                except (AssertionError, SystemExit):
                    helps[words] = None
        return helps[words]

    wrong, checked = [], 0
    for n, text in readme_commands():
        for m in re.finditer(rf"\b({'|'.join(map(re.escape, SCRIPTS))})\b((?:\s+[a-z][a-z0-9-]*)*)(.*)", text):
            words = (m.group(1),)
            for w in m.group(2).split():  # the longest run of subcommands the script knows
                text_of = help_of(words)
                if text_of is None or not re.search(rf"(?m)^\s+{re.escape(w)}\b|[{{,]{re.escape(w)}[,}}]", text_of):
                    break
                words = (*words, w)
            usage = help_of(words)
            if usage is None:
                continue
            for option in re.findall(OPTION, m.group(3)):
                checked += 1
                if not re.search(OPTION.replace("(--[a-z][a-z0-9-]*)", re.escape(option)) + r"(?![\w-])", usage):
                    wrong.append(f"README line {n}: {' '.join(words)} has no {option}: {text.strip()[:100]}")
    assert not wrong, "\n".join(wrong)
    assert checked > 50, checked  # the walk finds the README's commands
