"""Optional Weights & Biases logging (logging.wandb=true): the logged scalars are metrics.jsonl's, offline by
default; without the package the command refuses in one line saying how to install it, before any work.

The package is an optional extra, so a stand-in module records the calls (the real one is not needed to
check what is sent)."""

import json
import sys
import types

import pytest

from shiq_train import trainer as T


class FakeRun:
    def __init__(self, **kw):
        self.init, self.logged, self.finished = kw, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_metrics_go_to_wandb_offline_as_to_metrics_jsonl(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = T._MetricLog(tmp_path / "run", 0, True, False, T.LoggingConfig(wandb=True), {"loss": {"beta": 0.1}})
    log.write({"step": 1, "loss": 0.5, "reward": 1.0, "note": "text"})
    log.write({"step": 2, "loss": 0.25, "eval/reward_mean": 0.75})
    log.close()
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path / "run")
    assert run.init["config"] == {"loss": {"beta": 0.1}} and run.init["project"] == "shiq" and run.finished
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = [
        (
            m["step"],
            {(k if k.startswith("eval/") else f"train/{k}"): v for k, v in m.items() if k not in ("step", "note")},
        )
        for m in lines
    ]
    assert (
        run.logged
        == want
        == [(1, {"train/loss": 0.5, "train/reward": 1.0}), (2, {"train/loss": 0.25, "eval/reward_mean": 0.75})]
    )
    with pytest.raises(ValueError, match="logging.wandb_mode must be one of"):
        T.LoggingConfig(wandb=True, wandb_mode="cloud")


def test_without_the_package_the_command_says_how_to_install_it(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shiq_train import cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    overrides = [f"data.buffer={tmp_path / 'buffer'}", f"out={tmp_path / 'run'}", "logging.wandb=true"]
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)
    with pytest.raises(
        RuntimeError, match=r"needs the package wandb, which is not installed: pip install 'shiq\[wandb\]'"
    ):
        cli.run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_logs_to_its_own_wandb_run(tmp_path, monkeypatch):
    """Every resume started a new W&B run, so a preempted run's curve was split over as many runs as it had
    resumes. The run folder records its W&B run's id and its own path; a resume continues that run
    (``resume="allow"``); a start from step 0 begins a new one, as does a copy of the folder elsewhere (it would
    log into the original's run) or a record that is not one."""
    import shutil

    runs = []

    def init(**kw):
        runs.append(FakeRun(**kw))
        runs[-1].id = kw.get("id", f"new{len(runs)}")
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out, cfg = tmp_path / "run", T.LoggingConfig(wandb=True)

    def start(step, folder=out):
        log = T._MetricLog(folder, step, True, False, cfg)
        log.write({"step": step + 1, "loss": 0.5})
        log.close()
        return runs[-1].init

    def recorded(folder=out):
        return json.loads((folder / T.WANDB_RUN_ID).read_text())

    assert "id" not in start(0) and "resume" not in runs[-1].init
    assert recorded() == {"id": "new1", "folder": str(out.resolve())}
    assert start(1) == {**runs[0].init, "id": "new1", "resume": "allow"}
    assert "id" not in start(0)  # trained again from step 0: a new W&B run, recorded
    assert recorded()["id"] == "new3"
    shutil.copytree(out, tmp_path / "copy")
    assert "id" not in start(1, tmp_path / "copy")  # not the original's run
    assert recorded(tmp_path / "copy") == {"id": "new4", "folder": str((tmp_path / "copy").resolve())}
    assert start(2)["id"] == "new3"  # the original still resumes its own
    twice = json.dumps({"id": "new3", "folder": str(out.resolve())})[:-1] + ', "id": "other"}'
    for bad in ("../../etc\n", "[1]", '{"id": "a/b"}', twice, "[" * 100_000):
        (out / T.WANDB_RUN_ID).write_text(bad)
        assert "id" not in start(2)
        assert recorded()["id"] == runs[-1].id
