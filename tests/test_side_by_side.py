"""Runs side by side (``--jobs``): each in its own process with its share of the cores, its output in its
folder's run.log, its stages announced, a failure named and raised after the others finish."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiq_eval.recipes.side_by_side import LOG_NAME, run_each, run_side_by_side, threads_per_job


def fake_run(folder: str, fail: bool) -> None:
    """A run: finishes two stages (as ``Stages`` records them), prints, then fails or writes what it saw."""
    out = Path(folder)
    print(f"hello from {out.name}")
    (out / "stages.json").write_text(json.dumps({"done": {"a": 1.0, "b": 2.0}}))
    if fail:
        raise ValueError("row 3 field 'reward' is not a number")
    (out / "seen.json").write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads()}))


def test_threads_per_job_shares_the_cores():
    assert threads_per_job(1, available=2) == 2
    assert threads_per_job(2, available=2) == 1
    assert threads_per_job(3, available=2) == 1  # never 0
    assert threads_per_job(2, available=8) == 4
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        threads_per_job(0)
    assert threads_per_job(1024, available=2) == 1
    with pytest.raises(ValueError, match="--jobs must be at most 1024"):
        threads_per_job(1025)


def test_jobs_run_in_their_own_processes_with_their_share_of_the_cores(tmp_path):
    folders = {n: tmp_path / n for n in ("seed0", "seed1", "seed2")}
    folders["seed2"].mkdir()  # a resumed run: what it finished before is not announced again
    (folders["seed2"] / "stages.json").write_text(json.dumps({"done": {"a": 1.0}}))
    lines = []
    jobs = [(n, f, (str(f), False)) for n, f in folders.items()]
    run_side_by_side(f"{__name__}:fake_run", jobs, 2, lines.append, poll_seconds=0.05)
    pids = set()
    for name, folder in folders.items():
        seen = json.loads((folder / "seen.json").read_text())
        assert seen["pid"] != os.getpid()
        assert seen["threads"] == threads_per_job(2)
        pids.add(seen["pid"])
        assert f"hello from {name}" in (folder / LOG_NAME).read_text()
        assert f"{name}: done" in lines
        assert f"{name}: b finished (2 s)" in lines
    assert len(pids) >= 2  # two workers at least (a worker may take a second job)
    assert "seed0: a finished (1 s)" in lines and "seed2: a finished (1 s)" not in lines
    assert lines[0].startswith("3 runs, 2 at a time with")


def test_fewer_runs_than_jobs_share_all_the_cores(tmp_path, monkeypatch):
    """Two runs with --jobs 4 on 8 cores go two at a time: each gets 4 threads (8 // 2), not the 2 (8 // 4) that
    left half the cores idle."""
    import shiq_eval.recipes.side_by_side as sbs

    monkeypatch.setattr(sbs, "cores", lambda: 8)
    jobs = [(n, tmp_path / n, (str(tmp_path / n), False)) for n in ("seed0", "seed1")]
    lines = []
    run_side_by_side(f"{__name__}:fake_run", jobs, 4, lines.append, poll_seconds=0.05)
    for name in ("seed0", "seed1"):
        assert json.loads((tmp_path / name / "seen.json").read_text())["threads"] == 8 // 2
    assert lines[0] == f"2 runs, 2 at a time with 4 threads each; their output: <run>/{LOG_NAME}"


def test_a_failed_job_is_named_after_the_others_finish(tmp_path):
    jobs = [(n, tmp_path / n, (str(tmp_path / n), n == "seed0")) for n in ("seed0", "seed1")]
    lines = []
    with pytest.raises(ValueError, match=r"^seed0: row 3 field 'reward' is not a number$"):
        run_side_by_side(f"{__name__}:fake_run", jobs, 2, lines.append, poll_seconds=0.05)
    assert (tmp_path / "seed1" / "seen.json").exists()  # the other job ran to its end
    assert any(line.startswith("seed0: failed (ValueError") and LOG_NAME in line for line in lines)
    assert "seed1: done" in lines


def test_one_job_runs_each_in_this_process_one_after_the_other(tmp_path):
    folders = [tmp_path / n for n in ("seed0", "seed1")]
    for f in folders:
        f.mkdir()
    lines = []
    run_each(f"{__name__}:fake_run", [(f.name, f, (str(f), False)) for f in folders], 1, lines.append)
    for f in folders:
        assert json.loads((f / "seen.json").read_text())["pid"] == os.getpid()
        assert not (f / LOG_NAME).exists()  # its output stays where this process writes
    # each run's own lines (its stages') come after one that names it: they do not say which run they are of
    assert lines == [
        line
        for i, f in enumerate(folders)
        for line in (f"{f.name}: starting ({f}; run {i + 1} of 2)", f"{f.name}: done ({f})")
    ]
    jobs = [("seed0", folders[0], (str(folders[0]), True)), ("seed1", folders[1], (str(folders[1]), False))]
    (folders[1] / "seen.json").unlink()
    with pytest.raises(ValueError, match=r"^seed0: row 3 field 'reward' is not a number$"):  # at once, named
        run_each(f"{__name__}:fake_run", jobs, 1, lines.append)
    assert not (folders[1] / "seen.json").exists()  # the runs after it do not start


def test_several_jobs_go_side_by_side(tmp_path):
    folders = [tmp_path / n for n in ("seed0", "seed1")]
    lines = []
    run_each(
        f"{__name__}:fake_run", [(f.name, f, (str(f), False)) for f in folders], 2, lines.append, poll_seconds=0.05
    )
    for f in folders:
        assert json.loads((f / "seen.json").read_text())["pid"] != os.getpid()
        assert f"hello from {f.name}" in (f / LOG_NAME).read_text()


@pytest.mark.parametrize(
    ("prog", "args", "message"),
    [
        ("shiq-demo", ["--jobs", "2"], "--jobs runs the seeds of --full side by side"),
        ("shiq-demo", ["--full", "--jobs", "0"], "--jobs must be at least 1"),
        # 10**20 ended in "OverflowError: Python int too large to convert to C int" (the pool's queue), no option named
        (
            "shiq-demo",
            ["--full", "--jobs", str(10**20)],
            f"--jobs must be at most 1024 (runs side by side, one process each), got {10**20}",
        ),
        ("shiq-bfcl", ["--seeds", "0,1", "--jobs", str(10**20)], "--jobs must be at most 1024"),
        ("shiq-bfcl", ["--jobs", "2"], "--jobs runs the runs of --seeds side by side"),
    ],
)
def test_jobs_without_seeds_is_refused_in_one_line(tmp_path, prog, args, message):
    exe = Path(sys.executable).parent / prog
    res = subprocess.run([str(exe), "--out", str(tmp_path / "o"), *args], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("n_jobs, level, bars", [(1, "INFO", True), (3, "WARNING", False)])
def test_demo_full_hands_each_seed_to_the_runner_then_reports(tmp_path, monkeypatch, n_jobs, level, bars):
    """shiq-demo --full [--jobs 3]: every seed's run of full_runs, in its folder, to the runner (the demo's own
    run function, side by side or not as --jobs says; progress bars unless the log level is above INFO), then
    the report across the seeds."""
    from shiq_eval.recipes import demo

    handed, reported = [], []
    monkeypatch.setattr(demo, "run_each", lambda target, jobs, n, log, **kw: handed.append((target, jobs, n)))
    monkeypatch.setattr(demo, "full_report", lambda out, names: reported.append((out, names)) or {"best_beta": {}})
    assert demo.main(["--full", "--jobs", str(n_jobs), "--out", str(tmp_path), "--log-level", level]) == 0
    ((target, jobs, n),) = handed
    module, _, name = target.partition(":")
    assert sys.modules[module].__dict__[name] is demo.run and n == n_jobs
    runs = demo.full_runs(demo.load_config(full=True))
    assert jobs == [(s, tmp_path / s, (c, str(tmp_path / s), bars)) for s, c in runs]
    assert reported == [(tmp_path, [s for s, _ in runs])]


@pytest.mark.parametrize("n_jobs, level, bars", [(1, "WARNING", False), (2, "INFO", True)])
def test_bfcl_seeds_hands_each_seed_to_the_runner_then_reports(tmp_path, monkeypatch, n_jobs, level, bars):
    from shiq_eval.recipes import bfcl

    handed, reported = [], []
    monkeypatch.setattr(bfcl, "run_each", lambda target, jobs, n, log, **kw: handed.append((target, jobs, n)))
    monkeypatch.setattr(bfcl, "seeds_report", lambda out, names: reported.append((out, names)))
    assert (
        bfcl.main(["--quick", "--out", str(tmp_path), "--seeds", "3,7", "--jobs", str(n_jobs), "--log-level", level])
        == 0
    )
    ((target, jobs, n),) = handed
    module, _, name = target.partition(":")
    assert sys.modules[module].__dict__[name] is bfcl.run and n == n_jobs
    base = bfcl.load_config(quick=True)
    assert jobs == [
        (f"seed{s}", tmp_path / f"seed{s}", ({**base, "seed": s}, str(tmp_path / f"seed{s}"), bars)) for s in (3, 7)
    ]
    assert reported == [(tmp_path, ["seed3", "seed7"])]


def interval_run(folder: str) -> None:
    """A run that records the interval its progress bars redraw at (tqdm's, as every bar of a run is)."""
    from tqdm import tqdm

    with open(os.devnull, "w") as sink:
        (Path(folder) / "seen.json").write_text(json.dumps(tqdm(total=1, file=sink).mininterval))


def test_the_jobs_bars_redraw_as_into_a_log_whatever_the_commands_stderr(tmp_path, monkeypatch):
    """A job's output goes to its run.log, but its process got the command's environment, without the log's
    30 s interval when the command ran on a terminal (shiq_data.launch.progress_for_logs): each run.log got a
    bar's line ten times a second. A user's own TQDM_MININTERVAL is still theirs."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    folders = [tmp_path / "seed0", tmp_path / "seed1"]
    run_side_by_side(f"{__name__}:interval_run", [("seed0", folders[0], (str(folders[0]),))], 1, print)
    assert json.loads((folders[0] / "seen.json").read_text()) == 30.0
    assert "TQDM_MININTERVAL" not in os.environ  # (the command's own bars keep their interval)
    monkeypatch.setenv("TQDM_MININTERVAL", "4")
    run_side_by_side(f"{__name__}:interval_run", [("seed1", folders[1], (str(folders[1]),))], 1, print)
    assert json.loads((folders[1] / "seen.json").read_text()) == 4.0
