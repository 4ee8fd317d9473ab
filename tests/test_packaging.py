"""A non-editable install carries the configs: the wheel holds them as ``shiq_configs`` and the code
finds them there, not in a source tree next to it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_finds_its_configs_outside_the_source_tree(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("shiq_data", "shiq_train", "shiq_eval", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            *map(str, wheels.glob("shiq-*.whl")),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    shipped = sorted(
        p.relative_to(site / "shiq_configs").as_posix()
        for p in (site / "shiq_configs").rglob("*.*")
        if p.suffix in (".yaml", ".json", ".jsonl")
    )
    in_repo = sorted(
        p.relative_to(REPO / "configs").as_posix()
        for p in (REPO / "configs").rglob("*.*")
        if p.suffix in (".yaml", ".json", ".jsonl")
    )
    assert shipped == in_repo
    probe = (
        "import shiq_train, shiq_train.cli as c, shiq_eval.recipes.demo as d, shiq_eval.bfcl.data as b; "
        "print(shiq_train.__file__); print(c.CONFIG_DIR); print(d.CONFIG); print(b.SPLIT_PATH)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in out), out
    assert Path(out[2]).is_file() and Path(out[3]).is_file()
