"""Every console script's --help, and every subcommand's, is plain text without paths of the checkout.

The scripts come from pyproject.toml; subcommands are found in the help texts themselves (the choices
``{a,b,...}`` of a usage line, and ``PROG NAME ...`` lines of a usage section), so a new script or
subcommand is walked without editing this test. argparse commands run in this process; the Hydra
training command in a subprocess.
"""

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shiq_data.assets import config_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
MARKUP = ["``", ":func:", ":class:", ":mod:", ":meth:", ":attr:", ":param"]


def help_text(script: str, words: list[str], capsys, monkeypatch) -> str:
    if script == "shiq-train" and words[:1] not in (["ref-stats"], ["export"]):  # Hydra: its own process
        res = subprocess.run(
            [sys.executable, "-m", "shiq_train", *words, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO.parent,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout
    module, func = SCRIPTS[script].split(":")
    launch, ran = importlib.import_module(module), []  # the entry runs the command's module (shiq_data.launch)
    with monkeypatch.context() as m:
        m.setattr(launch, "run", lambda prog, name: ran.append(name))
        getattr(launch, func)()
    main = importlib.import_module(ran[0]).main
    monkeypatch.setattr(sys, "argv", [script, *words, "--help"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main() if script == "shiq-train" else main([*words, "--help"])
    assert done.value.code in (0, None), (script, words)
    return capsys.readouterr().out


def subcommands(script: str, words: list[str], text: str) -> list[str]:
    prog = " ".join([script, *words])
    found = []
    usage = text.split("\n\n")[0]
    while re.search(r"\[[^\[\]]*\]", usage):  # optional parts hold option choices, not subcommands
        usage = re.sub(r"\[[^\[\]]*\]", "", usage)
    usage = re.sub(r"-[-\w]+ \{[^}]*\}", "", usage)  # choices of a required option
    for group in re.findall(r"\{([a-z][a-z0-9_,-]*)\}", usage):
        found += group.split(",")
    found += re.findall(rf"^\s+{re.escape(prog)} ([a-z][a-z0-9-]+)(?= |$)", text, flags=re.M)
    return list(dict.fromkeys(w for w in found if w not in words))


def test_every_help_text_is_plain_and_names_no_checkout_path(capsys, monkeypatch):
    forbidden = {str(REPO), str(config_dir().resolve().parent), str(Path.home())} - {"/"}
    todo = [(script, []) for script in SCRIPTS]
    seen = []
    while todo:
        script, words = todo.pop(0)
        text = help_text(script, words, capsys, monkeypatch)
        seen.append(" ".join([script, *words]))
        assert len(text.splitlines()) > 3, (script, words, text)
        for bad in MARKUP + sorted(forbidden):
            assert bad not in text, (script, words, bad, text)
        if len(words) < 2:
            todo += [(script, [*words, w]) for w in subcommands(script, words, text)]
    for command in ("shiq-eval run", "shiq-eval leaderboard", "shiq-eval bfcl rollout", "shiq-train export"):
        assert command in seen, seen  # the walk reaches the subcommands
    assert "shiq-train ref-stats" in seen and "shiq-data build" in seen


@pytest.mark.parametrize("package,script", [("shiq_data", "shiq-data"), ("shiq_eval", "shiq-eval")])
def test_python_dash_m_runs_the_packages_command(package, script):
    """``python -m shiq_eval`` is ``shiq-eval`` as ``python -m shiq_data`` is ``shiq-data`` (and ``torchrun -m``
    takes the package as for ``shiq_train``): ``shiq_eval`` had no ``__main__`` and Python refused it."""
    res = subprocess.run(
        [sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: {script} ")
