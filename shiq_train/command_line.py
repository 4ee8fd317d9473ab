"""The ``shiq-train`` command line, read before any training module is imported.

``shiq-train`` dispatches its subcommands (``ref-stats``, ``export``), then checks the ``key=value`` settings
as Hydra will compose them (:func:`hydra_error`: an unknown key, a group option that does not exist, a value
Hydra cannot parse, a section removed, a ``data.buffer`` or ``init`` folder that does not exist), and only then
hands the composed configuration to the training (:func:`shiq_train.cli._task`), which imports torch and
megatron-core. A typo, ``--help`` or ``--cfg job`` thus
answers in about a second, before seconds of imports (more on a shared file system, once per rank under
torchrun).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from shiq_data.assets import config_dir
from shiq_data.cli_common import broken_pipe, fail, quiet_optional_dependencies, sigint_deferred
from shiq_data.io import text_place
from shiq_train.config_paths import missing_buffer, missing_init

CONFIG_DIR = config_dir()


OPTIONAL_SECTIONS = {"logging"}  # sections a run reads with their defaults when they are removed


def _closest(key: str, cfg) -> str:
    """``" (did you mean optimizer.lr?)"``: the settings of the configuration ``cfg`` that the unknown dotted
    ``key`` may have meant (a close spelling, or the same last part in another section), or ``""``."""

    def flat(node, prefix=""):
        for k, v in node.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    keys = list(flat(OmegaConf.to_container(cfg, resolve=False)))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _with_groups(argv: list[str], default):
    """The configuration composed with the groups ``argv`` chooses (``loss=qsharp_value``: the keys a misspelt
    ``loss.`` key was meant among), or ``default`` if it cannot be."""
    from hydra import compose, initialize_config_dir  # heavy: hydra, only the training command needs it

    groups = [a for a in argv if "=" in a and not a.startswith(("+", "~")) and "." not in a.split("=", 1)[0]]
    groups += [a for a in argv if a.startswith("hydra.searchpath=")]  # (--config-dir's folders)
    if not groups:  # (the default composition itself: composing it again costs a fifth of a second)
        return default
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name="train", overrides=groups)
    except Exception:  # (a bad choice among them: Hydra names it when the whole line is composed)
        return default


def _without_config_dirs(argv: list[str]) -> tuple[list[str], list[str | None]]:
    """``argv`` without Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``), and those folders (None:
    the flag ended the line, without its folder)."""
    rest, dirs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config-dir", "-cd"):
            dirs.append(argv[i + 1] if i + 1 < len(argv) else None)
            i += 2
            continue
        if arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1] or None)
        else:
            rest.append(arg)
        i += 1
    return rest, dirs


def _hydra_quoted(text: str) -> str:
    """``text`` to go between single quotes in a Hydra override: its quotes escaped, and the backslashes before a
    quote or at its end doubled (Hydra reads the others as they are)."""
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    return re.sub(r"(\\+)$", lambda m: m[1] * 2, text)


def _searched(argv: list[str], config_dirs: list[str]) -> tuple[list[str], list[str]]:
    """``(argv, [the override that adds config_dirs to Hydra's search path])`` for the check of a command line
    with ``--config-dir`` (``(argv, [])`` without). Hydra reads only the first ``hydra.searchpath=`` override: one
    the command line gives is taken out of ``argv`` and its folders searched too (else the check's replaced it, or
    it the check's). Each folder quoted: a path with a comma is one folder, not two."""
    if not config_dirs:
        return argv, []
    paths = [f"file://{Path(d).resolve()}" for d in config_dirs]
    given = next((i for i, a in enumerate(argv) if a.startswith("hydra.searchpath=")), None)
    if given is not None:
        from hydra.core.override_parser.overrides_parser import OverridesParser  # heavy: hydra

        try:
            value = OverridesParser.create().parse_override(argv[given]).value()
        except Exception:  # (Hydra's own complaint about it comes from the composition)
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            argv, paths = argv[:given] + argv[given + 1 :], paths + value
    quoted = ",".join(f"'{_hydra_quoted(p)}'" for p in paths)
    return argv, [f"hydra.searchpath=[{quoted}]"]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``FILE: line L, column C: not valid YAML (what PyYAML found)`` for a config file PyYAML could not read
    (Hydra opens the file, so the mark names it; a control character's error names it and its character index)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    if mark is not None:
        return f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({problem})"
    if isinstance(e, yaml.reader.ReaderError):  # a control character: no mark, its place a character index
        try:
            place = "line {}, column {}".format(*text_place(Path(e.name).read_text(encoding="utf-8"), e.position))
        except (OSError, ValueError):
            place = f"character {e.position + 1}"
        return f"{e.name}: {place}: not valid YAML ({str(e).splitlines()[0]})"
    return f"a config file is not valid YAML ({problem})"


def _chosen(argv: list[str]) -> dict[str, str]:
    """``{group: option}`` the command line ``argv`` chooses (``loss=dpo``), or train.yaml's defaults."""
    defaults = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text(encoding="utf-8"))["defaults"]
    chosen = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items() if " " not in k}
    for arg in argv:  # (the last choice of a group is Hydra's)
        key, _, value = arg.partition("=")
        if key in chosen and value:
            chosen[key] = value
    return chosen


def _chosen_files(argv: list[str], config_dirs: list[str]):
    """``(group, option, folder, FILE)`` for each group option ``argv`` chooses (:func:`_chosen`) and each
    --config-dir ``folder``: ``FILE`` the group file of that name the folder may hold (it may not exist)."""
    for group, name in _chosen(argv).items():
        for folder in config_dirs:
            yield group, name, folder, Path(folder) / group / f"{name}.yaml"


def _undecodable(argv: list[str], config_dirs: list[str]) -> str | None:
    """``FILE: line L: not valid YAML (not UTF-8 text: ...)`` for a group file of --config-dir's chosen by ``argv``
    that is not UTF-8 (Hydra's error names no file), or None."""
    for _, _, _, mine in _chosen_files(argv, config_dirs):
        try:
            data = mine.read_bytes()
            data.decode("utf-8")
        except OSError:
            continue
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            return f"{mine}: line {line}: not valid YAML (not UTF-8 text: byte 0x{data[e.start]:02x}, {e.reason})"
    return None


def _shadowed(argv: list[str], config_dirs: list[str]) -> str | None:
    """The refusal of a group file of --config-dir's that the run would not read: one named as the packaged option
    chosen (``DIR/loss/shiq.yaml`` beside ``loss=shiq``, or the default), whose packaged file Hydra finds first
    on its search path, when the two differ in their settings (a copy of the packaged one is read alike)."""
    if not config_dirs:  # (no group file of the user's: nothing to read at every start)
        return None
    for group, name, folder, mine in _chosen_files(argv, config_dirs):
        packaged = CONFIG_DIR / group / f"{name}.yaml"
        if not (packaged.is_file() and mine.is_file()) or mine.resolve() == packaged.resolve():
            continue
        try:
            same = yaml.safe_load(mine.read_text(encoding="utf-8")) == yaml.safe_load(packaged.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            same = False
        if not same:
            return (
                f"--config-dir {folder}: {mine} is not read: {group}={name} is the packaged option of that name, "
                f"which Hydra finds first; give your file another name and choose it ({group}=my_{name}), or, "
                "to resume a run started with it, leave out --config-dir (the run trained without the file)"
            )
    return None


def hydra_error(argv: list[str]) -> str | None:
    """Hydra's complaint about the command line ``argv`` (an unknown key or group option, a value it cannot
    parse, a section removed or replaced by a value) on one line, or None. Composes the config as Hydra will,
    and the default one to compare its sections with; Hydra's own flags (``--help``, ``--cfg``, ...) are left
    to Hydra, but for ``--multirun``."""
    sweep = next((a for a in argv if a in ("-m", "--multirun") or a.startswith("--multirun=")), None)
    if sweep is not None:  # Hydra would make ./multirun/DATE/TIME/ and stop the sweep at the first failing job
        return (
            f"{sweep}: shiq-train runs one job, in its own out= folder; for a sweep, run it once per value "
            "(for b in 0.1 0.3; do shiq-train ... loss.beta=$b out=runs/beta$b; done), or shiq-demo --full"
        )
    argv, config_dirs = _without_config_dirs(argv)
    flags = [a for a in argv if a.startswith("-")]
    if flags:  # Hydra's own flags are Hydra's; another gave its usage block, several lines, and exit status 0
        from hydra._internal.utils import get_args_parser  # heavy: hydra, only the training command needs it

        known = set(get_args_parser()._option_string_actions)
        unknown = next((a for a in flags if a.split("=", 1)[0] not in known), None)
        if unknown is None:
            return None
        hint = "; the log level is logging.level=LEVEL" if unknown.startswith("--log-level") else ""
        return f"{unknown}: not an option of shiq-train, which takes key=value settings{hint}"
    for folder in config_dirs:
        if folder is None:
            return "--config-dir needs a folder: --config-dir DIR (a folder of your own config groups, loss/ or model/)"
        if not Path(folder).is_dir():
            return f"--config-dir {folder}: no such folder"
    # Hydra looks in --config-dir's folders for the groups too (loss=mine: DIR/loss/mine.yaml); so does the check
    argv, searched = _searched(argv, config_dirs)
    keyless = [a for a in argv if a.startswith("=")]
    if keyless:
        return f"argument {keyless[0]!r} has no key: expected key=value"
    from hydra import compose, initialize_config_dir  # heavy: hydra, only the training command needs it
    from hydra.errors import HydraException  # heavy: hydra
    from omegaconf.errors import OmegaConfBaseException

    default = None
    try:
        # (a Ctrl-C inside OmegaConf's merge became its own UnboundLocalError, a traceback: it waits for the end)
        with sigint_deferred(), initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            default = compose(config_name="train")
            given = compose(config_name="train", overrides=searched + argv)
    except yaml.YAMLError as e:  # a group file of --config-dir's that is not YAML: PyYAML's multi-line traceback
        return _yaml_problem(e)
    except UnicodeDecodeError as e:  # a group file of --config-dir's that is not UTF-8: Hydra's line named none
        return _undecodable(argv, config_dirs) or f"a config file is not UTF-8 text ({e})"
    except (HydraException, OmegaConfBaseException, ValueError, KeyError, TypeError) as e:
        # (ValueError and the others: override forms Hydra's parser lets through, such as "=5")
        lines = []
        for line in str(e).splitlines():
            if line.startswith("Config search path"):
                break
            if line.strip() and not line.strip().startswith(("full_key:", "object_type=", "See https://")):
                lines.append(line.strip())
        # a heading that ends in ':' and the items Hydra lists under it, one a line: "options in 'loss': a, b"
        parts: list[list[str]] = []
        for line in lines:
            if parts and parts[-1][0].endswith(":"):
                parts[-1].append(line)
            else:
                parts.append([line])
        message = "; ".join(" ".join([p[0], ", ".join(p[1:])]) if p[1:] else p[0] for p in parts)
        message = message or type(e).__name__
        unknown = re.match(r"Could not override '([^']+)'.*To append to your config use \+", message)
        if unknown and default is not None:  # Hydra's advice, +key=value, would be refused next (below)
            return f"{unknown[1]}: no such setting{_closest(unknown[1], _with_groups(searched + argv, default))}"
        if "LexerNoViableAlt" in message:  # a character Hydra's grammar does not take unquoted (ü, ...)
            message += " (quote such a value: key='value', inside the shell's own quotes)"
        return message
    shadowed = _shadowed(argv, config_dirs)
    if shadowed:
        return shadowed
    buffer = OmegaConf.select(given, "data.buffer", throw_on_missing=False, throw_on_resolution_failure=False)
    if isinstance(buffer, str) and (refusal := missing_buffer(buffer)):  # (before seconds of imports; the run's too)
        return refusal
    init = OmegaConf.select(given, "init", throw_on_missing=False, throw_on_resolution_failure=False)
    if isinstance(init, str) and (refusal := missing_init(init)):
        return refusal
    composed = default  # (for _with_groups below)
    default, given = (OmegaConf.to_container(c, resolve=False) for c in (default, given))
    for key in given.keys() - default.keys() - {"resume"}:  # +foo=1 was kept in config.yaml, read by nothing
        return f"+{key}: {key!r} is no option of shiq-train"
    # (the loss and model chosen)
    chosen = OmegaConf.to_container(_with_groups(searched + argv, composed), resolve=False)
    for key, section in given.items():  # +data.foo=1, +train.eval_every=3 likewise: read by nothing
        if key != "resume" and isinstance(section, dict) and isinstance(chosen.get(key), dict):
            for added in sorted(section.keys() - chosen[key].keys()):
                return f"+{key}.{added}: '{key}.{added}' is no option of shiq-train"
    for key, section in default.items():  # a section removed (~loss) or replaced by a value (data=x)
        if key in OPTIONAL_SECTIONS:  # read as cfg.get(key) or {}
            continue
        if isinstance(section, dict) and key not in given:
            return f"the section {key!r} was removed (~{key}); training needs it"
        if isinstance(section, dict) and not isinstance(given[key], dict):
            return f"{key!r} is a section of options: set its keys ({key}.<name>=...), not {key}={given[key]!r}"
    return None


def main() -> int | None:
    """Console entry point (Hydra parses the command line; ``--help`` explains the options)."""
    if sys.argv[1:2] == ["ref-stats"]:  # shiq-train ref-stats BUFFER --model ...
        from shiq_train import reference  # heavy: torch

        return reference.main(sys.argv[2:])
    if sys.argv[1:2] == ["export"]:  # shiq-train export RUN [--step N] --hf OUT
        from shiq_train import export  # heavy: torch

        return export.main(sys.argv[2:])
    import hydra  # only the training command needs it

    quiet_optional_dependencies()
    problem = hydra_error(sys.argv[1:])
    if problem:
        sys.exit(fail("shiq-train", f"command line: {problem} (see shiq-train --help)"))
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="train")(_task)()
    except BrokenPipeError as e:  # Hydra's own output (--help, --cfg job) to a reader that went away (| head)
        sys.exit(broken_pipe("shiq-train", e))


def _task(cfg) -> None:
    """The training (or Q♯'s value model's) on the composed configuration ``cfg``: imports torch and
    megatron-core (Hydra has answered ``--help`` and its other flags before)."""
    from shiq_train.cli import _task as train  # heavy: torch, megatron-core

    train(cfg)


if __name__ == "__main__":
    main()
