"""The training command line and packed-row attention.

Packed rows: a block-diagonal causal mask (``shiq_train.model.model_inputs`` with ``segment_ids``)
must give every trajectory of a packed row exactly the per-token statistics it has when run alone.
"""

import warnings

import pytest
import torch
from checkpoint_files import write_meta

from shiq_train import model as M
from shiq_train import parallel


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=3):
        yield


def test_packed_row_stats_equal_rows_run_separately(dist1):
    model = M.build_model(M.ModelConfig(vocab_size=128, max_sequence_length=16)).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 5), generator=g), torch.randint(0, 128, (1, 7), generator=g)
    c = torch.randint(0, 128, (1, 9), generator=g)
    pad = torch.zeros(1, 4, dtype=torch.long)
    packed = torch.cat([torch.cat([a, b, pad], 1), torch.cat([c, a, pad[:, :2]], 1)])
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 5 + [2] * 2])
    with torch.no_grad():
        st = M.forward_stats(model, packed, seg)
        alone = {k: M.forward_stats(model, x) for k, x in {"a": a, "b": b, "c": c}.items()}
        unmasked = M.forward_stats(model, packed)
    # position 0 of a segment holds a prediction from the previous segment: compare from 1 on
    for row, start, key, n in [(0, 0, "a", 5), (0, 5, "b", 7), (1, 0, "c", 9), (1, 9, "a", 5)]:
        for got, want in [(st.chosen_logits, alone[key].chosen_logits), (st.logz, alone[key].logz)]:
            torch.testing.assert_close(got[row, start + 1 : start + n], want[0, 1:], rtol=1e-5, atol=1e-5)
    # without the block mask the second trajectory would see the first one
    assert (unmasked.logz[0, 6:12] - alone["b"].logz[0, 1:]).abs().max() > 1e-4
    assert M.packed_position_ids(seg)[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# the command line, run as a user would (subprocesses), on a seeded in-memory data source

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import commands  # noqa: E402
from process_tree import descendants  # noqa: E402

from shiq_train.cli import resolve_data_mode  # noqa: E402
from shiq_train.parallel import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Runs shiq-train's entry point with open_data_source replaced by seeded synthetic micro-batches
# (same rows on every rank of a tp=2 group, as a dp_world=1 sampler gives them), and the buffer check by
# the manifest such a buffer would have.
DRIVER = """
import sys, torch
import shiq_train.cli as cli
import shiq_train.command_line as command_line

class Source:
    def __init__(self, seed, rows, micro_batches):
        self.seed, self.rows, self.micro_batches, self.pos = seed, rows, micro_batches, 0
    def batch(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        tokens = torch.randint(0, 128, (self.rows, 16), generator=g)
        mask = torch.zeros(self.rows, 16, dtype=torch.bool)
        mask[:, 5:] = True
        rewards = torch.zeros(self.rows, 16)
        rewards[:, -1] = torch.randn(self.rows, generator=g)
        return {"tokens": tokens, "action_mask": mask, "rewards": rewards,
                "group_ids": torch.arange(self.rows) // 2}
    def next_micro_batches(self):
        out = [self.batch(self.pos + k) for k in range(self.micro_batches)]
        self.pos += self.micro_batches
        return out
    def state_dict(self):
        return {"pos": self.pos}
    def load_state_dict(self, s):
        self.pos = s["pos"]

def fake_source(data_cfg, mode, reference, dp_rank, dp_world, max_tokens, width_multiple):
    assert dp_world == 1 and mode in ("padded", "groups") and width_multiple == 1, (dp_world, mode, width_multiple)
    return Source(data_cfg["seed"], data_cfg["rows_per_micro_batch"], data_cfg["micro_batches_per_step"])

cli.open_data_source = fake_source
cli.check_buffer = lambda buffer_dir, model_cfg, init: {"tokenizer": {"name": "test", "fingerprint": "0", "vocab_size": 128}}
cli.check_buffer_fits = lambda *a: None  # no buffer: the fake source stands in for it
command_line.main()
"""


def run_cli(tmp_path, *overrides, nproc=1, timeout=120):
    cmd, env = cli_command(tmp_path, *overrides, nproc=nproc)
    if nproc == 1:  # (forked from a process that imported torch and megatron-core: see commands.py)
        return commands.run(cmd, cwd=REPO, env=env, timeout=timeout)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def cli_command(tmp_path, *overrides, nproc=1):
    """The command line (and environment) of shiq-train's entry on the fake data source, in ``nproc`` processes."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    (tmp_path / "buffer").mkdir(exist_ok=True)
    launcher = (
        [sys.executable]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = launcher + [
        str(driver),
        f"data.buffer={tmp_path / 'buffer'}",
        "train.progress=false",
        "train.tensorboard=false",
        *overrides,
    ]
    return cmd, env


def test_a_reader_that_goes_away_stops_shiq_train_quietly(tmp_path):
    """``shiq-train ... | true``: the reader exits before the run prints its last line; the run stops with the
    shell's SIGPIPE status (141), its checkpoint written, with no 'Broken pipe' error or traceback on stderr."""
    cmd, env = cli_command(tmp_path, f"out={tmp_path / 'run'}", "train.steps=1", "train.reference=online")
    line = " ".join(shlex.quote(c) for c in cmd)
    proc = subprocess.run(
        ["bash", "-c", f"{line} 2>{shlex.quote(str(tmp_path / 'err'))} | true; echo ${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    err = (tmp_path / "err").read_text()
    assert proc.stdout.strip() == "141", (proc.stdout, err[-3000:])
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err.lower(), err[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "meta.json").is_file()


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_single_process_run_and_tp2_torchrun_give_the_same_steps(tmp_path):
    """The first step's loss alone could not tell: with an online reference the policy is the reference then, and
    the loss is the rewards' alone (a wrong log-partition under TP passed). Every step's loss and gradient norm
    are compared, and a resume in another layout continues as the one-process run does."""
    common = ["train.steps=3", "train.reference=online", "loss.beta=0.5", "seed=11", "optimizer.lr=1e-3"]
    one = run_cli(tmp_path, f"out={tmp_path / 'one'}", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    m1 = metrics(tmp_path / "one")
    assert [m["step"] for m in m1] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in m1)
    step_dir = tmp_path / "one" / "checkpoints" / "step_00000003"
    assert (step_dir / "rank_tp0_pp0_dp0.pt").is_file()
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["meta"]["loss"]["name"] == "shiq" and meta["meta"]["hf_config"]["num_hidden_layers"] == 2
    assert "metrics.jsonl" in one.stdout  # says where the outputs went

    two = run_cli(tmp_path, f"out={tmp_path / 'two'}", "parallel.tp=2", *common, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = metrics(tmp_path / "two")
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5), key
    assert json.loads((tmp_path / "two/checkpoints/step_00000003/meta.json").read_text())["layout"]["tp"] == 2

    # the TP=2 run continues in one process: parallel.tp may change, the checkpoint is cut for the new layout
    more = [c for c in common if not c.startswith("train.steps")] + ["train.steps=4"]
    nccl = run_cli(tmp_path, f"out={tmp_path / 'two'}", *more, "parallel.backend=nccl")  # this machine has no GPU
    assert nccl.returncode == 2 and "parallel.backend=nccl needs a CUDA GPU and NCCL" in nccl.stderr
    assert "Traceback" not in nccl.stderr and len(metrics(tmp_path / "two")) == 3
    back = run_cli(tmp_path, f"out={tmp_path / 'two'}", *more, "parallel.backend=gloo")  # may change on resume
    assert back.returncode == 0, back.stderr[-3000:]
    assert "resumed from step 3" in back.stderr
    m3 = metrics(tmp_path / "two")
    assert m3[:3] == m2 and m3[3]["step"] == 4
    assert run_cli(tmp_path, f"out={tmp_path / 'one'}", *more).returncode == 0  # the one-process run, resumed
    m4 = metrics(tmp_path / "one")[3]
    assert (m3[3]["loss"], m3[3]["grad_norm"]) == pytest.approx((m4["loss"], m4["grad_norm"]), rel=1e-5)
    assert json.loads((tmp_path / "two/checkpoints/step_00000004/meta.json").read_text())["layout"]["tp"] == 1


def test_a_resume_keeps_the_global_batch_when_the_data_parallel_size_changes(tmp_path):
    """parallel.tp/pp may change on resume; data.micro_batches_per_step may change exactly when the global
    batch (data-parallel size x micro-batches per rank) stays, and a change of it is refused with the value
    that keeps it."""
    import yaml

    from shiq_train.cli import ConfigError, check_resume_config

    cfg = {"parallel": {"tp": 1, "pp": 1}, "data": {"micro_batches_per_step": 2}, "loss": {"beta": 0.1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))

    def resume(tp=1, pp=1, m=2, dp=(1, 1), allowed=()):
        new = {"parallel": {"tp": tp, "pp": pp}, "data": {"micro_batches_per_step": m}, "loss": {"beta": 0.1}}
        return check_resume_config(tmp_path, new, set(allowed), False, dp)

    assert resume(tp=2, pp=2) == ["parallel.pp", "parallel.tp"]
    assert resume(m=1, dp=(1, 2)) == [] and resume(m=4, dp=(2, 1)) == []
    with pytest.raises(ConfigError) as e:
        resume(dp=(1, 2))
    assert (
        "data.micro_batches_per_step=2 over 1 -> 2 data-parallel ranks (a global batch of 1 x 2 micro-batches "
        "saved, 2 x 2 now over data-parallel ranks; data.micro_batches_per_step=1 keeps it)" in str(e.value)
    )
    assert "+resume.allow_changed=[data.micro_batches_per_step]" in str(e.value)
    with pytest.raises(ConfigError, match=r"2 -> 3 \(a global batch of 1 x 2 micro-batches saved, 1 x 3 now"):
        resume(m=3)
    with pytest.raises(ConfigError, match=r"1 x 2 micro-batches saved, 4 x 2 now over data-parallel ranks\)"):
        resume(dp=(1, 4))  # 2 micro-batches do not split over 4 ranks: no value keeps the global batch
    assert resume(dp=(1, 2), allowed=["data.micro_batches_per_step"]) == ["data.micro_batches_per_step"]
    # config.yaml as a start in one process wrote it before it was killed, ahead of any checkpoint of its own; the
    # checkpoint's global batch is 2 ranks x 1 micro-batch (its own configuration's value)
    assert check_resume_config(tmp_path, cfg, set(), False, (2, 1), saved_micro_batches=1) == []
    for damaged in (0, -1, True, "1"):  # a hand-edited meta.json: config.yaml's value serves (no advice of "=0")
        assert check_resume_config(tmp_path, cfg, set(), False, (1, 1), saved_micro_batches=damaged) == []
    with pytest.raises(ConfigError, match=r"1 -> 4 \(a global batch of 2 x 1 micro-batches saved, 1 x 4 now.*=2 keeps"):
        new = {**cfg, "data": {"micro_batches_per_step": 4}}
        check_resume_config(tmp_path, new, set(), False, (2, 1), saved_micro_batches=1)


def test_the_data_order_seed_cannot_change_on_resume_whatever_is_allowed(tmp_path):
    """+resume.allow_changed=[data.seed] and +resume.force=true passed the configuration check; the sampler then
    refused the checkpoint's position (another seed, another order) after the model was built, naming "seed"
    alone (the run has a top-level seed too). The check now refuses it first, naming data.seed."""
    import yaml

    from shiq_train.cli import ConfigError, check_resume_config

    cfg = {"seed": 0, "data": {"seed": 0, "buffer": "b"}, "loss": {"beta": 0.1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    other = {"seed": 5, "data": {"seed": 5, "buffer": "b"}, "loss": {"beta": 0.1}}
    for allowed, force in [(set(), False), ({"seed", "data.seed"}, False), (set(), True)]:
        with pytest.raises(ConfigError, match=r"started with data\.seed=0 and this configuration gives 5: the rows"):
            check_resume_config(tmp_path, other, allowed, force)
    assert check_resume_config(tmp_path, {**cfg, "seed": 5}, {"seed"}, False) == ["seed"]  # (data.seed given: kept)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "loss": {"beta": 0.1}}))  # saved without it
    assert check_resume_config(tmp_path, other, set(), True) == ["data.buffer", "data.seed", "seed"]


def test_a_change_of_optimizer_distributed_is_a_change_like_any_other(tmp_path):
    """A run saved with the plain optimizer resumes with optimizer.distributed=true and the other way, once the
    change is allowed (the state converts: tests/test_checkpoint_layouts.py); unallowed, it is named."""
    import yaml

    from shiq_train.cli import ConfigError, check_resume_config

    cfg = {"optimizer": {"distributed": False, "lr": 1e-3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    on = {"optimizer": {"distributed": True, "lr": 1e-3}}
    with pytest.raises(ConfigError, match=r"optimizer\.distributed") as e:
        check_resume_config(tmp_path, on, set(), False)
    assert "+resume.allow_changed=[optimizer.distributed]" in str(e.value)
    assert check_resume_config(tmp_path, on, {"optimizer.distributed"}, False) == ["optimizer.distributed"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(on))
    assert check_resume_config(tmp_path, cfg, {"optimizer.distributed"}, False) == ["optimizer.distributed"]


def test_the_global_batch_is_compared_with_the_checkpoints_own(tmp_path):
    """A checkpoint saved at DP=2 with 1 micro-batch a rank, then a start in one process with 2 (the same global
    batch) killed before it saved one: its config.yaml says 2, and the same command again was refused (2 x 2
    saved, it said, against 1 x 2), while the value it advised (4) trained twice the batch."""
    import yaml

    out = tmp_path / "run"
    common = ["train.reference=online", "seed=3"]
    first = run_cli(tmp_path, f"out={out}", "train.steps=2", "data.micro_batches_per_step=1", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    meta = out / "checkpoints" / "step_00000002" / "meta.json"  # as a DP=2 run saved it (the rank files serve)
    write_meta(meta, meta.read_text().replace('"dp": 1', '"dp": 2'))
    for suffix in ("", ".sha256"):  # the file the second data-parallel rank wrote
        shutil.copy(meta.parent / f"rank_tp0_pp0_dp0.pt{suffix}", meta.parent / f"rank_tp0_pp0_dp1.pt{suffix}")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["data"]["micro_batches_per_step"] = 2  # as the killed start in one process wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    twice = run_cli(tmp_path, f"out={out}", "train.steps=3", "data.micro_batches_per_step=4", *common)
    assert twice.returncode == 2 and "a global batch of 2 x 1 micro-batches saved, 1 x 4 now" in twice.stderr
    again = run_cli(tmp_path, f"out={out}", "train.steps=3", "data.micro_batches_per_step=2", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stderr and [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_bad_configs_fail_with_a_clear_message(tmp_path):
    unknown = run_cli(tmp_path, f"out={tmp_path / 'x'}", "loss=shiq_fast")
    assert unknown.returncode != 0 and "Could not find 'loss/shiq_fast'" in unknown.stderr
    missing = run_cli(tmp_path, f"out={tmp_path / 'x'}", f"data.buffer={tmp_path / 'nope'}")
    assert missing.returncode == 2 and f"data.buffer='{tmp_path / 'nope'}' does not exist" in missing.stderr
    no_out = run_cli(tmp_path)
    assert no_out.returncode == 2 and "missing value for out" in no_out.stderr
    packed = run_cli(tmp_path, f"out={tmp_path / 'x'}", "train.share_prefixes=true", "data.mode=packed")
    assert packed.returncode == 2 and "train.share_prefixes=true needs one trajectory per row" in packed.stderr
    assert "Traceback" not in packed.stderr
    dropout = run_cli(tmp_path, f"out={tmp_path / 'x'}", "train.share_prefixes=true", "model.hidden_dropout=0.1")
    assert dropout.returncode == 2 and "model.hidden_dropout=0.1" in dropout.stderr, dropout.stderr[-1000:]
    assert "no dropout and megatron's local layers" in dropout.stderr and "Traceback" not in dropout.stderr


def test_group_losses_force_group_batches():
    assert resolve_data_mode("dpo", None) == ("groups", None)
    mode, note = resolve_data_mode("copg", "padded")
    assert mode == "groups" and "data.mode=groups instead of data.mode=padded" in note
    assert resolve_data_mode("shiq", None) == ("padded", None)
    assert resolve_data_mode("shiq_tk", "packed") == ("packed", None)
    with pytest.raises(ValueError, match="data.mode must be one of"):
        resolve_data_mode("shiq", "shuffled")
    with pytest.raises(ValueError, match="loss 'dpo' reads one trajectory per row, but data.mode=packed"):
        resolve_data_mode("dpo", "packed")


def test_the_loss_registry_drives_the_data_mode(monkeypatch):
    """Every registered loss gets the mode its flags ask for, and a new group loss needs only its entry."""
    from shiq_train import objectives

    group_losses = {"dpo", "mt_dpo", "copg", "mt_copg", "dro_v_loo"}
    assert {n for n, s in objectives.LOSSES.items() if s.needs_groups} == group_losses
    assert {n for n, s in objectives.LOSSES.items() if s.packed_ok} == {
        "shiq",
        "shiq_init",
        "shiq_ms",
        "shiq_tk",
        "dro_v",
        "sft",
    }
    for name in objectives.LOSSES:
        if name in group_losses:
            assert resolve_data_mode(name, None) == ("groups", None)
            assert resolve_data_mode(name, "padded")[0] == "groups"
            with pytest.raises(ValueError, match="data.mode=groups or null"):
                resolve_data_mode(name, "packed")
        elif objectives.LOSSES[name].packed_ok:
            assert resolve_data_mode(name, None) == ("padded", None)
            assert resolve_data_mode(name, "packed") == ("packed", None)
        else:  # the Q♯ value model reads one trajectory per row
            assert objectives.LOSSES[name].trains == "value"
            assert resolve_data_mode(name, None) == ("padded", None)
            with pytest.raises(ValueError, match="data.mode=padded or null"):
                resolve_data_mode(name, "packed")
    new = objectives.LossSpec("pairwise_new", "a new group loss", needs_groups=True, group_loss=objectives._copg)
    monkeypatch.setitem(objectives.LOSSES, "pairwise_new", new)
    mode, note = resolve_data_mode("pairwise_new", "padded")
    assert mode == "groups" and "using data.mode=groups instead of data.mode=padded" in note
    with pytest.raises(ValueError, match="loss name must be one of"):
        resolve_data_mode("ppo", None)


def write_tiny_buffer(path, with_ref: bool):
    """8 rows in 4 prompt groups of 2, through shiq_data's own writer (reference columns optional)."""
    from shiq_data.buffer import write_buffer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 10 + i % 3
        row = {
            "group_id": i // 2,
            "prompt_len": 4,
            "tokens": torch.randint(0, 128, (n,), generator=g).tolist(),
            "action_mask": [False] * 4 + [True] * (n - 4),
            "rewards": [0.0] * (n - 1) + [float(i % 2)],
            "source": "test",
        }
        if with_ref:
            row["ref_chosen_logits"] = [0.0] * n
            row["ref_logz"] = [0.0] + [math.log(128.0)] * (n - 1)  # position 0: nothing predicts it
        rows.append(row)
    write_buffer(
        rows,
        path,
        tokenizer_info={"name": "test", "fingerprint": "0", "vocab_size": 128},
        command=["test"],
        progress=False,
    )


def test_real_buffer_reference_check_and_forced_group_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "shiq_train", "train.progress=false", "train.tensorboard=false", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )

    write_tiny_buffer(tmp_path / "plain", with_ref=False)
    no_ref = cli(f"data.buffer={tmp_path / 'plain'}", f"out={tmp_path / 'a'}")
    assert no_ref.returncode == 2 and "has no reference statistics" in no_ref.stderr
    assert "train.reference=online" in no_ref.stderr

    dpo = cli(
        f"data.buffer={tmp_path / 'plain'}",
        f"out={tmp_path / 'b'}",
        "loss=dpo",
        "data.mode=padded",
        "train.reference=online",
        "train.steps=2",
        "data.rows_per_micro_batch=4",
    )
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    assert "using data.mode=groups instead of data.mode=padded" in dpo.stderr
    m = metrics(tmp_path / "b")
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m) and m[0]["pairs"] > 0

    write_tiny_buffer(tmp_path / "ref", with_ref=True)
    packed = cli(
        f"data.buffer={tmp_path / 'ref'}",
        f"out={tmp_path / 'c'}",
        "data.mode=packed",
        "train.steps=2",
        "model.max_sequence_length=32",
        "data.rows_per_micro_batch=2",
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert all(math.isfinite(x["loss"]) for x in metrics(tmp_path / "c"))


def test_sft_trains_on_a_buffer_without_reference_statistics(tmp_path):
    """sft reads no reference statistics, yet a buffer without them was refused under the default
    train.reference=precomputed (asking for ref-stats or an online copy of the model); it trains, with the losses
    of the same run over an online reference, which sft does not read either."""
    write_tiny_buffer(tmp_path / "plain", with_ref=False)
    args = [f"data.buffer={tmp_path / 'plain'}", "loss=sft", "train.steps=2", "data.rows_per_micro_batch=2"]
    res = train_cli(*args, f"out={tmp_path / 'a'}")
    assert res.returncode == 0, res.stderr[-2000:]
    online = train_cli(*args, f"out={tmp_path / 'b'}", "train.reference=online")
    assert online.returncode == 0, online.stderr[-2000:]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2]  # (two empty logs were equal too)
    assert all(math.isfinite(x["loss"]) for x in a)
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b])


def test_a_pair_loss_on_a_buffer_of_one_row_groups_is_refused(tmp_path):
    """DPO and CoPG read pairs of a group's rows: on a buffer whose groups all hold one row every step had no pair
    and trained nothing (loss 0, gradient 0), ending with status 0. Refused in one line naming the buffer and
    the loss, no run folder; dro_v_loo (its leave-one-out value falls back to the micro-batch) still trains."""
    from shiq_data.buffer import open_buffer, write_buffer

    write_tiny_buffer(tmp_path / "src", with_ref=True)
    rows = [dict(r, group_id=i) for i, r in enumerate(open_buffer(tmp_path / "src").table.to_pylist())]
    info = {"name": "test", "fingerprint": "0", "vocab_size": 128}
    write_buffer(rows, tmp_path / "buf", tokenizer_info=info, command=["test"], progress=False)
    args = [f"data.buffer={tmp_path / 'buf'}", "train.steps=1", "data.rows_per_micro_batch=2"]
    for loss in ("dpo", "copg"):
        res = train_cli(*args, f"out={tmp_path / loss}", f"loss={loss}")
        assert res.returncode == 2, res.stderr[-2000:]
        line = res.stderr.strip().splitlines()[-1]
        assert line.startswith("shiq-train: error: ") and f"loss={loss}" in line and "one row" in line
        assert str(tmp_path / "buf") in line and "Traceback" not in res.stderr and not (tmp_path / loss).exists()
    ok = train_cli(*args, f"out={tmp_path / 'loo'}", "loss=dro_v_loo")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_dpo_on_a_buffer_whose_groups_all_tie_is_refused(tmp_path):
    """DPO orders a group's pairs by return and drops ties: on a buffer of one reward for every completion (an
    unscored buffer) every step had no pair and trained nothing, ending with status 0. Refused in one line, no run
    folder; one group with two returns is enough, and CoPG (whose pairs need no order) still trains."""
    from shiq_data.buffer import open_buffer, write_buffer

    write_tiny_buffer(tmp_path / "src", with_ref=True)
    rows = open_buffer(tmp_path / "src").table.to_pylist()
    info = {"name": "test", "fingerprint": "0", "vocab_size": 128}
    tied = [dict(r, rewards=[0.0] * (len(r["rewards"]) - 1) + [0.5]) for r in rows]
    write_buffer(tied, tmp_path / "tied", tokenizer_info=info, command=["test"], progress=False)
    args = [f"data.buffer={tmp_path / 'tied'}", "train.steps=1"]
    res = train_cli(*args, f"out={tmp_path / 'dpo'}", "loss=dpo")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("shiq-train: error: ") and "loss=dpo" in line and "same return" in line
    assert str(tmp_path / "tied") in line and "Traceback" not in res.stderr and not (tmp_path / "dpo").exists()
    assert train_cli(*args, f"out={tmp_path / 'copg'}", "loss=copg").returncode == 0
    tied[-1]["rewards"] = [0.0] * (len(tied[-1]["rewards"]) - 1) + [1.0]  # the last group now orders one pair
    # (in the last of several shards: the returns are read shard by shard)
    write_buffer(tied, tmp_path / "one_pair", tokenizer_info=info, command=["test"], progress=False, shard_rows=2)
    assert len(json.loads((tmp_path / "one_pair" / "manifest.json").read_text())["shards"]) > 2
    ok = train_cli(f"data.buffer={tmp_path / 'one_pair'}", "train.steps=1", f"out={tmp_path / 'ok'}", "loss=dpo")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_returns_that_tie_in_training_s_float32_are_ties_for_the_dpo_check(tmp_path):
    """Training sums a row's rewards in float32 (losses.sequence_return) and DPO drops exact ties; the start check
    summed them in float64, where 0.1 + 0.2 and 0.3 differ, so a multi-turn buffer of such returns passed it and
    trained nothing. The returns are now the training's own: torch's pairs and the check agree."""
    from shiq_data.buffer import open_buffer, write_buffer
    from shiq_train.cli import ConfigError, check_pairs
    from shiq_train.losses import preference_pairs, sequence_return

    write_tiny_buffer(tmp_path / "src", with_ref=True)
    rows = open_buffer(tmp_path / "src").table.to_pylist()
    for k, r in enumerate(rows):  # two turns' rewards 0.1 and 0.2, or one of 0.3, on action positions
        acts = [t for t, m in enumerate(r["action_mask"]) if m]
        r["rewards"] = [0.0] * len(r["rewards"])
        if k % 2:
            r["rewards"][acts[0]], r["rewards"][acts[-1]] = 0.1, 0.2
        else:
            r["rewards"][acts[-1]] = 0.3
    info = {"name": "test", "fingerprint": "0", "vocab_size": 128}
    write_buffer(rows, tmp_path / "buf", tokenizer_info=info, command=["test"], progress=False)
    table = open_buffer(tmp_path / "buf").table
    width = max(len(r) for r in table.column("rewards").to_pylist())
    rewards = torch.tensor([r + [0.0] * (width - len(r)) for r in table.column("rewards").to_pylist()])
    mask = torch.tensor([m + [False] * (width - len(m)) for m in table.column("action_mask").to_pylist()])
    groups = torch.tensor(table.column("group_id").to_pylist())
    assert rewards.dtype == torch.float32 and len(set(groups.tolist())) < len(groups)  # groups of several rows
    assert preference_pairs(sequence_return(rewards, mask), groups)[0].numel() == 0  # training's ties
    with pytest.raises(ConfigError, match="same return"):
        check_pairs(tmp_path / "buf", "mt_dpo")
    check_pairs(tmp_path / "buf", "mt_copg")  # (pairs without an order: they train)


def test_a_frozen_prefix_cache_of_packed_rows_is_refused_before_it_is_built(tmp_path):
    """The cache cannot serve packed rows, which was found only after one forward pass over the whole buffer."""
    write_tiny_buffer(tmp_path / "ref", with_ref=True)
    res = train_cli(
        f"data.buffer={tmp_path / 'ref'}",
        f"out={tmp_path / 'run'}",
        "data.mode=packed",
        "model.max_sequence_length=32",
        "data.rows_per_micro_batch=1",
        "train.trainable_last_layers=1",
        "train.cache_frozen_prefix=true",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "frozen-prefix cache:" not in res.stderr  # (the line the cache prints when it is built)
    assert "train.cache_frozen_prefix=true does not support packed rows" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_run_killed_mid_training_resumes_to_the_uninterrupted_losses(tmp_path):
    """SIGKILL a real `shiq-train` process between checkpoints, rerun the same command: the metrics read
    as one run and equal an uninterrupted run's, step for step (data order, dropout RNG, optimizer)."""
    import signal
    import time

    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    steps = 300

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "shiq_train",
            f"data.buffer={tmp_path / 'buf'}",
            f"out={out}",
            "train.progress=false",
            "train.tensorboard=false",
            f"train.steps={steps}",
            "train.save_every=25",
            "model.hidden_dropout=0.1",
            "data.rows_per_micro_batch=2",
            "optimizer.lr=1e-3",
            "seed=3",
        ]

    straight = subprocess.run(cmd(tmp_path / "a"), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_00000050" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in metrics(out))
    assert 50 <= killed_at < steps  # killed part-way, after at least two checkpoints
    # what a kill during a save leaves (atomic_write's temporaries): gone once the run resumes
    step_dir = sorted((out / "checkpoints").glob("step_*"))[-1]
    planted = [step_dir / ".rank_tp0_pp0_dp0.pt.abc123.tmp", out / "checkpoints" / ".latest.xyz.tmp"]
    for path in planted:
        path.write_bytes(b"partial")

    resumed = subprocess.run(cmd(out), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(path.exists() for path in planted)
    got, want = metrics(out), metrics(tmp_path / "a")
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]


def test_sigterm_saves_the_step_under_way_and_the_rerun_continues_as_one_run(tmp_path):
    """SIGTERM (a scheduler's stop) ended a run at once, losing every step since its last checkpoint (with
    train.save_every=0, all of them). Now the step under way finishes and is saved, the run ends in one line with
    status 143, and the same command continues it: the metrics equal an uninterrupted run's, step for step."""
    import signal
    import time

    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    steps = 40  # stopped after its third logged step: far from its end

    def cmd(out):
        return [
            sys.executable, "-m", "shiq_train", f"data.buffer={tmp_path / 'buf'}", f"out={out}",
            "train.progress=false", "train.tensorboard=false", f"train.steps={steps}", "train.save_every=0",
            "model.hidden_dropout=0.1", "data.rows_per_micro_batch=2", "optimizer.lr=1e-3", "seed=3",
        ]  # fmt: skip

    straight = subprocess.run(cmd(tmp_path / "a"), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-3000:]
    stopped_at = max(m["step"] for m in metrics(out))
    assert 3 <= stopped_at < steps and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"shiq-train: terminated after saving step {stopped_at} (SIGTERM); the same command resumes the run there"
    )
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped_at:08d}"]

    resumed = subprocess.run(cmd(out), capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stderr
    got, want = metrics(out), metrics(tmp_path / "a")
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]


def test_sigterm_to_one_rank_saves_the_same_step_on_every_rank(tmp_path):
    """A SIGTERM that reaches one rank alone (a node's stop): the ranks agree after each step, so both save the
    same step, whole, and the run continues from it, in another layout too."""
    import signal
    import time

    common = ["train.steps=400", "train.reference=online", "loss.beta=0.5", "seed=11", "optimizer.lr=1e-3"]
    cmd, env = cli_command(tmp_path, f"out={tmp_path / 'run'}", "parallel.tp=2", *common, nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, log = time.time() + 240, tmp_path / "run" / "metrics.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    ranks = {}
    for pid in descendants(proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ and b"LOCAL_RANK=1" in environ:
            ranks[1] = pid
    os.kill(ranks[1], signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0, err[-3000:]
    assert "terminated after saving step" in err, err[-3000:]
    assert err.count("shiq-train: terminated") == 1, err[-3000:]  # rank 0's line, not one per rank
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")]
    assert len(saved) == 1 and int(saved[0][5:]) >= 2, saved
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / saved[0]).iterdir())
    assert [f for f in files if f.endswith(".pt")] == ["rank_tp0_pp0_dp0.pt", "rank_tp1_pp0_dp0.pt"], files
    more = [c for c in common if not c.startswith("train.steps")] + [f"train.steps={int(saved[0][5:]) + 1}"]
    back = run_cli(tmp_path, f"out={tmp_path / 'run'}", *more)  # one process: the checkpoint is whole
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"resumed from step {int(saved[0][5:])}" in back.stderr


LAST_STEP_SIGTERM = """
import os, signal
calls = []
_next = Source.next_micro_batches
def next_micro_batches(self):  # a SIGTERM while step SIGTERM_AT_STEP is under way
    calls.append(1)
    if len(calls) == int(os.environ["SIGTERM_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return _next(self)
Source.next_micro_batches = next_micro_batches
command_line.main()
"""


def test_a_sigterm_during_the_last_step_says_the_run_is_complete(tmp_path):
    """A SIGTERM during a run's last step saved it and said "the same command resumes the run there", though the
    run was complete (the rerun trains nothing). It still ends with status 143 (a recipe training several runs
    stops too), saying the run is complete."""
    cmd, env = cli_command(tmp_path, f"out={tmp_path / 'run'}", "train.steps=3", "train.reference=online")
    (tmp_path / "driver.py").write_text(DRIVER.replace("command_line.main()\n", LAST_STEP_SIGTERM))
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**env, "SIGTERM_AT_STEP": "3"}, timeout=120
    )
    assert res.returncode == 143, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "shiq-train: terminated after saving step 3 (SIGTERM), the run's last: the run is complete"
    )
    (tmp_path / "driver.py").write_text(DRIVER)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert again.returncode == 0 and "(already complete)" in again.stdout, again.stderr[-3000:]


STARTUP_SIGNAL = """
import os, signal
import shiq_train.parallel as parallel
_init, _remove = parallel.init_distributed, cli.remove_half_made_run
def init_distributed(*a, **k):  # the signal comes with the run folder made and locked, before any step
    os.kill(os.getpid(), getattr(signal, os.environ["STARTUP_SIGNAL"]))
    return _init(*a, **k)
def remove_half_made_run(*a):  # the same stop's second SIGTERM (Slurm's and torchrun's) during the cleanup
    if os.environ["STARTUP_SIGNAL"] == "SIGTERM":
        os.kill(os.getpid(), signal.SIGTERM)
    return _remove(*a)
parallel.init_distributed, cli.remove_half_made_run = init_distributed, remove_half_made_run
command_line.main()
"""


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_while_the_run_starts_leaves_no_run_folder_behind(tmp_path, name, status):
    """SIGTERM once the run folder was made and locked, before the first step, ended the process by SIGTERM's
    own action: the folder and its .lock stayed (a Ctrl-C there, while megatron was imported or the process
    groups started, left them too). Now either is a stop like any other: one line, the shell's status, the lock
    released and the folder the start made removed, a second SIGTERM of the same stop during that included."""
    out = tmp_path / "runs" / "new"
    cmd, env = cli_command(tmp_path, f"out={out}", "train.steps=2", "train.reference=online")
    (tmp_path / "driver.py").write_text(DRIVER.replace("command_line.main()\n", STARTUP_SIGNAL))
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**env, "STARTUP_SIGNAL": name}, timeout=120
    )
    assert res.returncode == status and "Traceback" not in res.stderr, (res.returncode, res.stderr[-3000:])
    stopped = "terminated" if name == "SIGTERM" else "interrupted"
    assert res.stderr.strip().splitlines()[-1] == (
        f"shiq-train: {stopped} (the same command resumes the run from its last checkpoint, if it saved one)"
    )
    assert not (tmp_path / "runs").exists()


def test_a_resume_from_an_earlier_step_moves_the_later_steps_out_of_the_run(tmp_path):
    """A run resumed from an earlier step than its newest (latest wound back by hand) kept the later step folders
    beside the ones it saved: shiq-eval run RUN read both histories as one run. They are now moved, with their
    lines of the log, into checkpoints/superseded_1, named in a warning; the run keeps the history it continues."""
    run = tmp_path / "run"
    common = [f"out={run}", "train.reference=online", "optimizer.lr=1e-3"]
    first = run_cli(tmp_path, *common, "train.steps=4", "train.save_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "metrics.jsonl").read_text().splitlines()
    (run / "checkpoints" / "latest").write_text("step_00000002\n")

    again = run_cli(tmp_path, *common, "train.steps=3", "train.save_every=0")
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3)]
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    aside = ckpt / "superseded_1"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000003", "step_00000004"]
    assert (aside / "metrics.jsonl").read_text().splitlines() == before[2:]
    assert (aside / "step_00000004" / "meta.json").is_file()
    assert [m["step"] for m in metrics(run)] == [1, 2, 3] and (run / "metrics.jsonl").read_text().splitlines()[
        :2
    ] == before[:2]
    assert f"{ckpt} holds step_00000003, step_00000004 after step 2, the one it resumes from" in again.stderr
    assert f"to {aside}, out of the history it continues" in again.stderr


def test_a_sigterm_request_is_seen_once_and_a_late_one_still_stops_the_caller():
    """sigterm_requests: the first SIGTERM is recorded, not acted on (the handler stays, for a repeat of the same
    stop); a request no requested() saw raises Terminated at the block's end (a recipe training several runs
    stops too); the block gives SIGTERM its action back; not enabled, SIGTERM keeps its action."""
    import signal

    from shiq_data.cli_common import Terminated
    from shiq_train.trainer import sigterm_requests

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # sigterm_requests would leave it be
        pytest.skip("SIGTERM is handled by the test runner")
    with sigterm_requests(True) as requested:
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL and not requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested() and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(Terminated), sigterm_requests(True):
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with sigterm_requests(True) as requested:  # a block that ends without a request leaves SIGTERM as it was
        assert not requested()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with sigterm_requests(False) as requested:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not requested()


def _late_sigterm_worker(rank, port, results):
    import signal

    import torch.distributed as dist

    from shiq_data.cli_common import Terminated
    from shiq_train.trainer import sigterm_requests

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with sigterm_requests(True) as requested:
            assert not requested()  # the last step's agreement: nobody asked yet
            if rank == 1:  # after it: rank 0 cannot know of this request but by another all-reduce
                os.kill(os.getpid(), signal.SIGTERM)
        outcome = "returned"
    except Terminated:
        outcome = "terminated"
    finally:
        dist.destroy_process_group()
    (Path(results) / str(rank)).write_text(outcome)


def test_a_late_sigterm_request_to_one_rank_stops_every_rank(tmp_path):
    """A SIGTERM that reaches one rank after the last requested() (its last step's all-reduce) stopped that rank
    alone at the block's end, while the others returned: ranks ending apart (a recipe training several runs went
    on into the next one without it). The ranks agree once more at the block's end: every rank stops."""
    from ranks import spawn

    spawn(_late_sigterm_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == ["terminated", "terminated"]


SECOND_SIGTERMS = """
import os, signal, time
import shiq_train.trainer as T

T.SIGTERM_SAME_STOP_S = 2.0
now, sent = [100.0], []  # the handler's clock, moved by the script alone (not by the machine's pace)

def monotonic():  # a second SIGTERM arrives while the handler records the first
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    return now[0]

time.monotonic = monotonic
with T.sigterm_requests(True) as requested:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # (a handler runs between bytecodes: here, had it not run yet)
    now[0] += 0.1
    os.kill(os.getpid(), signal.SIGTERM)  # Slurm's and torchrun's: the same stop
    time.sleep(0.05)
    print("same stop", requested(), flush=True)
    now[0] += 2.1
    os.kill(os.getpid(), signal.SIGTERM)  # a stop asked for again, later: at once
    time.sleep(5)
print("survived")
"""


def test_sigterms_of_one_stop_are_one_and_a_later_one_ends_the_process():
    """Under Slurm and torchrun a worker gets two SIGTERMs for one stop, milliseconds apart (Slurm signals every
    process of the job step, torchrun passes its own on): the second ended the process at once, before the step
    under way was saved. A SIGTERM within SIGTERM_SAME_STOP_S of the first is now the same stop, one that
    interrupts the handler recording the first included (it takes no lock, so it cannot wait for itself); a later
    one ends the process at once."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        res = subprocess.run(
            [sys.executable, "-c", SECOND_SIGTERMS], env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:  # (killed by subprocess.run)
        pytest.fail("the process hung on a second SIGTERM that came while the first was being recorded")
    assert res.stdout.split("\n")[0] == "same stop True", (res.returncode, res.stdout, res.stderr[-2000:])
    assert res.returncode == -signal.SIGTERM and "survived" not in res.stdout, (res.returncode, res.stdout)


def save_tiny_llama(folder):
    """A tiny Llama (GQA, untied sizes differing from the tiny model config) saved by transformers."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    hf.save_pretrained(folder)
    return hf


def test_init_folder_decides_the_model_shape(tmp_path):
    """init=FOLDER with no model group: the shape comes from its config.json, the weights from the folder."""
    hf = save_tiny_llama(tmp_path / "llama")
    common = [f"init={tmp_path / 'llama'}", "train.steps=1", "optimizer.lr=1e-12", "train.reference=online"]
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    want = {
        "name": "llama",
        "num_layers": 2,
        "hidden_size": 32,
        "ffn_hidden_size": 80,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "rotary_base": 50000,
        "max_sequence_length": 32,
        "params_dtype": "float32",  # not in a checkpoint: from the model config
    }
    assert {k: model[k] for k in want} == want
    state = torch.load(tmp_path / "run/checkpoints/step_00000001/rank_tp0_pp0_dp0.pt", weights_only=True)
    emb = state["model"]["embedding.word_embeddings.weight"]
    torch.testing.assert_close(emb, hf.model.embed_tokens.weight.detach(), rtol=0, atol=1e-6)

    # a model.* key given on the command line wins over the folder's value
    res = run_cli(tmp_path, f"out={tmp_path / 'short'}", *common, "model.max_sequence_length=16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())["model"]["max_sequence_length"] == 16
    # an explicitly chosen model group is checked against the folder, as before
    res = run_cli(tmp_path, f"out={tmp_path / 'tiny'}", *common, "model=tiny")
    assert res.returncode == 2 and "model.hidden_size=64 but the checkpoint has 32" in res.stderr


def test_a_qwen2_init_folder_trains_and_its_checkpoint_exports_as_qwen2(tmp_path):
    """init=a Qwen2 folder: the run builds the model with its query/key/value biases (model.add_qkv_bias),
    records its Qwen2 config, and the checkpoint comes back as a Qwen2ForCausalLM with the folder's logits
    (lr 1e-12: the step changes nothing visible). The folder was refused (model_type 'qwen2')."""
    import transformers
    import yaml

    from shiq_train.checkpoint import read_meta
    from shiq_train.export import hf_model_from_checkpoint

    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1.0, 1.0)
    hf.save_pretrained(tmp_path / "qwen2")
    common = [f"init={tmp_path / 'qwen2'}", "train.steps=1", "optimizer.lr=1e-12", "train.reference=online"]
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["add_qkv_bias"] is True
    step_dir = tmp_path / "run/checkpoints/step_00000001"
    hf_config = read_meta(step_dir)["meta"]["hf_config"]
    assert hf_config["model_type"] == "qwen2"
    back = hf_model_from_checkpoint(step_dir, hf_config)
    assert isinstance(back, transformers.Qwen2ForCausalLM)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max() < 1e-4
    # read with a Llama config of the same sizes (ref-stats --model LLAMA --megatron-checkpoint RUN), its biases
    # were dropped without a word (logits off by 1.27 in a review): refused, naming them
    llama = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")})
    with pytest.raises(ValueError, match=r"its weights do not fit meta.hf_config .*no place for: .*linear_qkv.bias"):
        hf_model_from_checkpoint(step_dir, llama)
    # the megatron evaluation engine reads the recorded config as Qwen2's, biases included
    from types import SimpleNamespace

    from shiq_eval.cli import MegatronEngine
    from shiq_train import parallel

    with parallel.distributed(seed=0):
        engine = MegatronEngine(hf, SimpleNamespace(eos_token_id=0, pad_token_id=0))
        logits, _ = engine.policy({"kind": "run", "path": step_dir, "hf_config": hf_config})
        got = logits(tokens).logits
    assert (got - hf(tokens).logits).abs().max() < 1e-4


def test_a_qwen3_init_folder_trains_and_its_checkpoint_exports_as_qwen3(tmp_path):
    """init=a Qwen3 folder (heads 16 wide with hidden_size 32 and 4 heads; random query and key norm weights):
    the run builds the model with its query and key norms (model.qk_layernorm) and head width
    (model.kv_channels), records its Qwen3 config, and the checkpoint comes back as a Qwen3ForCausalLM with the
    folder's logits (lr 1e-12: the step changes nothing visible), as shiq-train export reads it and through the
    megatron evaluation engine. The folder was refused (model_type 'qwen3')."""
    import transformers
    import yaml

    from shiq_train.checkpoint import read_meta
    from shiq_train.export import hf_model_from_checkpoint

    cfg = transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "qwen3")
    common = [f"init={tmp_path / 'qwen3'}", "train.steps=1", "optimizer.lr=1e-12", "train.reference=online"]
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert model["qk_layernorm"] is True and model["kv_channels"] == 16 and model["add_qkv_bias"] is False
    step_dir = tmp_path / "run/checkpoints/step_00000001"
    hf_config = read_meta(step_dir)["meta"]["hf_config"]
    assert hf_config["model_type"] == "qwen3" and hf_config["head_dim"] == 16
    back = hf_model_from_checkpoint(step_dir, hf_config)
    assert isinstance(back, transformers.Qwen3ForCausalLM)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max() < 1e-4
    back.save_pretrained(tmp_path / "export")  # (as shiq-train export writes it, with the run's tokenizer)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(exported, transformers.Qwen3ForCausalLM) and exported.config.head_dim == 16
    with torch.no_grad():
        assert (exported(tokens).logits - hf(tokens).logits).abs().max() < 1e-4
    from shiq_eval.cli import MegatronEngine

    with parallel.distributed(seed=0):
        engine = MegatronEngine(hf, SimpleNamespace(eos_token_id=0, pad_token_id=0))
        logits, _ = engine.policy({"kind": "run", "path": step_dir, "hf_config": hf_config})
        got = logits(tokens).logits
    assert (got - hf(tokens).logits).abs().max() < 1e-4


def test_a_llama3_init_folder_trains_and_its_checkpoint_exports_with_its_rope_scaling(tmp_path):
    """init=a Llama 3.2-style folder (rope_type llama3, factor 32; weights large enough that plain RoPE moves the
    logits by more than 1e-2): the run records model.rope_scaling_factor, its checkpoint comes back (shiq-train
    export's reading, and the megatron evaluation engine) with the folder's logits and rope parameters, and a
    model group without the scaling is refused naming the field. The folder was refused (rope_type 'llama3')."""
    import transformers
    import yaml

    from shiq_train.checkpoint import read_meta
    from shiq_train.export import hf_model_from_checkpoint

    rope = {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
    }  # fmt: skip

    def llama(rope):
        cfg = transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=32, tie_word_embeddings=True,
            initializer_range=0.2, rope_parameters=rope,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    hf = llama(rope)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        assert (llama({"rope_type": "default", "rope_theta": 500000.0})(tokens).logits - want).abs().max() > 1e-2
    hf.save_pretrained(tmp_path / "llama3")
    common = [f"init={tmp_path / 'llama3'}", "train.steps=1", "optimizer.lr=1e-12", "train.reference=online"]
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert model["rope_scaling_factor"] == 32.0 and model["rotary_base"] == 500000
    step_dir = tmp_path / "run/checkpoints/step_00000001"
    hf_config = read_meta(step_dir)["meta"]["hf_config"]
    assert hf_config["rope_parameters"] == rope
    back = hf_model_from_checkpoint(step_dir, hf_config)
    assert back.config.rope_parameters == rope
    with torch.no_grad():
        assert (back(tokens).logits - want).abs().max() < 1e-4
    from shiq_eval.cli import MegatronEngine

    with parallel.distributed(seed=0):
        engine = MegatronEngine(hf, SimpleNamespace(eos_token_id=0, pad_token_id=0))
        logits, _ = engine.policy({"kind": "run", "path": step_dir, "hf_config": hf_config})
        got = logits(tokens).logits
    assert (got - want).abs().max() < 1e-4
    # a model config without the scaling does not fit the folder (the check the run makes before it builds)
    from shiq_train.cli import ConfigError, check_shape, load_init, model_config

    folder = str(tmp_path / "llama3")
    plain = {**model_config(M.ModelConfig().to_dict(), folder, set()).to_dict(), "rope_scaling_factor": None}
    with pytest.raises(ConfigError, match=r"model.rope_scaling_factor=None but the checkpoint has 32.0"):
        check_shape(M.ModelConfig(**plain), load_init(folder)[1], folder)


def test_init_folder_of_another_model_type_is_refused(tmp_path):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", f"init={folder}")
    assert res.returncode == 2
    line = f"shiq-train: error: init='{folder}': {folder / 'config.json'} has model_type 'gpt2'"
    assert res.stderr.strip().splitlines()[-1].startswith(line), res.stderr[-2000:]


def test_model_keys_given_on_the_command_line():
    from shiq_train.cli import model_keys_given

    assert model_keys_given(["init=x", "model.max_sequence_length=64", "+model.fp8=null", "loss=dpo"]) == {
        "max_sequence_length",
        "fp8",
    }
    assert model_keys_given(["model=smollm2_135m", "model.fp8=null"]) is None


def write_buffer_with_tokenizer(path, tokenizer_info, with_ref=False):
    """The rows of :func:`write_tiny_buffer` under another tokenizer record."""
    from shiq_data.buffer import write_buffer

    write_tiny_buffer(path.with_name(path.name + ".src"), with_ref)
    from shiq_data.buffer import open_buffer

    rows = open_buffer(path.with_name(path.name + ".src")).table.to_pylist()
    write_buffer(rows, path, tokenizer_info=tokenizer_info, command=["test"], progress=False)


def train_cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "shiq_train", "train.progress=false", "train.tensorboard=false", *args]
    return commands.run(cmd, cwd=REPO, env=env, timeout=timeout)


def test_a_buffer_with_a_larger_vocabulary_than_the_model_is_refused_before_training(tmp_path):
    """Ids up to 199 would index past a 128-row embedding: refused naming both sizes, not an IndexError."""
    write_buffer_with_tokenizer(tmp_path / "buf", {"name": "big", "fingerprint": "1", "vocab_size": 200}, True)
    res = train_cli(f"data.buffer={tmp_path / 'buf'}", f"out={tmp_path / 'run'}", "train.steps=1")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("shiq-train: error: ") and "'big' has 200 tokens" in line and "only 128" in line
    assert "Traceback" not in res.stderr and "IndexError" not in res.stderr
    ok = train_cli(
        f"data.buffer={tmp_path / 'buf'}", f"out={tmp_path / 'run2'}", "model.vocab_size=200", "train.steps=1"
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_gpt2_buffer_is_refused_on_smollm2_naming_both_tokenizers(tmp_path):
    """init=smollm2 carries SmolLM2's tokenizer: a GPT-2 buffer (its real fingerprint) is refused before the
    model is loaded, the message naming both tokenizers."""
    from shiq_data.assets import AssetMissing
    from shiq_data.tokenizers import load_tokenizer

    try:
        smollm2 = load_tokenizer("smollm2")[1]
    except AssetMissing as e:  # the packaged model is an optional asset; any other error fails the test
        pytest.skip(str(e))
    gpt2 = load_tokenizer("gpt2")[1]
    assert gpt2["fingerprint"] != smollm2["fingerprint"]
    write_buffer_with_tokenizer(tmp_path / "buf", gpt2)
    common = ["model=smollm2_135m", "init=smollm2", "train.reference=online", "train.steps=1"]
    res = train_cli(f"data.buffer={tmp_path / 'buf'}", f"out={tmp_path / 'run'}", *common, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert "tokenizer 'gpt2'" in line and gpt2["fingerprint"][:12] in line
    assert "tokenizer 'smollm2'" in line and smollm2["fingerprint"][:12] in line
    assert "Traceback" not in res.stderr


def test_reference_statistics_of_another_precision_are_refused(tmp_path):
    """Statistics record their dtype (none recorded: float32). Training in bf16 against float32 statistics,
    or in float32 against bf16 ones, is refused before any work, saying what to run."""
    write_tiny_buffer(tmp_path / "f32", with_ref=True)  # written before dtypes were recorded: float32
    res = train_cli(f"data.buffer={tmp_path / 'f32'}", f"out={tmp_path / 'a'}", "model.params_dtype=bfloat16")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert "computed in float32 but model.params_dtype=bfloat16" in line and "--dtype bfloat16" in line
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()

    from shiq_data.buffer import open_buffer, write_buffer

    rows = open_buffer(tmp_path / "f32").table.to_pylist()
    tok = {"name": "test", "fingerprint": "0", "vocab_size": 128}
    bf16 = {"model": "x", "dtype": "bfloat16"}
    write_buffer(rows, tmp_path / "bf16", tokenizer_info=tok, command=["t"], progress=False, ref_model=bf16)
    res = train_cli(f"data.buffer={tmp_path / 'bf16'}", f"out={tmp_path / 'b'}", "train.steps=1")
    assert res.returncode == 2 and "computed in bfloat16 but model.params_dtype=float32" in res.stderr
    # the online reference needs no statistics: any precision trains
    res = train_cli(
        f"data.buffer={tmp_path / 'bf16'}", f"out={tmp_path / 'c'}", "train.steps=1", "train.reference=online"
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_resuming_with_a_changed_configuration_is_refused_unless_allowed(tmp_path):
    """A rerun into a run folder compares its configuration with config.yaml: a changed loss.beta or model
    size is refused naming the key, and config.yaml stays byte for byte; train.steps may change; an
    explicit +resume.allow_changed accepts a key; every resume says from which step."""
    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    run = tmp_path / "run"
    base = [f"data.buffer={tmp_path / 'buf'}", f"out={run}", "data.rows_per_micro_batch=2"]
    first = train_cli(*base, "train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "resumed from step" not in first.stderr
    saved = (run / "config.yaml").read_bytes()

    beta = train_cli(*base, "train.steps=3", "loss.beta=0.5")
    assert beta.returncode == 2, beta.stderr[-2000:]
    line = beta.stderr.strip().splitlines()[-1]
    assert "loss.beta 0.1 -> 0.5" in line and "train.steps" not in line and "+resume.allow_changed=[loss.beta]" in line
    size = train_cli(*base, "train.steps=3", "model.hidden_size=32")
    assert size.returncode == 2 and "model.hidden_size 64 -> 32" in size.stderr and "Traceback" not in size.stderr
    assert (run / "config.yaml").read_bytes() == saved
    assert [m["step"] for m in metrics(run)] == [1, 2]

    # what changes no step may change too: the README's advice to quieten the log or skip verified checksums
    # was refused on a rerun
    longer = train_cli(*base, "train.steps=3", "logging.level=DEBUG", "data.verify_checksums=false")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "shiq-train: resumed from step 2" in longer.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    # asked for fewer steps than the run has: nothing trains, and the closing line says so ("already complete");
    # config.yaml keeps the settings the run trained with (it recorded train.steps=1 and, from a run in another
    # layout that trained nothing, that layout)
    saved = (run / "config.yaml").read_bytes()
    fewer = train_cli(*base, "train.steps=1")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert "1 step (nothing trained: the run is at step 3, past train.steps=1)" in fewer.stdout, fewer.stdout
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    done = train_cli(*base, "train.steps=3", "train.log_every=2")
    assert done.returncode == 0 and "3 steps (already complete)" in done.stdout, done.stdout + done.stderr[-2000:]
    assert (run / "config.yaml").read_bytes() == saved

    allowed = train_cli(*base, "train.steps=4", "loss.beta=0.5", "+resume.allow_changed=[loss.beta]")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "resumed from step 3" in allowed.stderr
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["loss"]["beta"] == 0.5 and config["train"]["steps"] == 4 and "resume" not in config

    # forced past the check, a model that does not fit the checkpoint still fails cleanly, config.yaml intact
    saved = (run / "config.yaml").read_bytes()
    forced = train_cli(*base, "train.steps=5", "loss.beta=0.5", "model.hidden_size=32", "+resume.force=true")
    assert forced.returncode == 2 and "Traceback" not in forced.stderr, forced.stderr[-2000:]
    assert "has shape" in forced.stderr.strip().splitlines()[-1]
    assert (run / "config.yaml").read_bytes() == saved
    # forced past the check, another data order (packed rows) is refused naming the checkpoint it was read
    # from (the sampler's line named the buffer alone)
    forced = train_cli(*base, "train.steps=5", "data.mode=packed", "+resume.force=true")
    assert forced.returncode == 2 and "Traceback" not in forced.stderr, forced.stderr[-2000:]
    assert re.search(
        rf"error: {re.escape(str(run / 'checkpoints' / 'step_00000004'))}: its data position cannot be resumed: sampler "
        r"state does not match this sampler: mode is 'padded' in the state, 'packed' here \(buffer ",
        forced.stderr,
    ), forced.stderr[-2000:]
    assert (run / "config.yaml").read_bytes() == saved


def test_a_resume_at_or_past_train_steps_says_nothing_was_trained_and_rewrites_nothing(tmp_path):
    """A rerun of a run saved at step 2 with train.steps=2 (a finished command run again: a scheduler's retry) or
    train.steps=1 said only "resumed from step 2" on stderr, rewrote metrics.jsonl and added a TensorBoard file;
    now it says on stderr that nothing was trained and which train.steps continues the run, exit 0 all the same,
    and no file of the run folder changes."""
    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    run = tmp_path / "run"
    base = [f"data.buffer={tmp_path / 'buf'}", f"out={run}", "data.rows_per_micro_batch=2", "train.tensorboard=true"]
    first = train_cli(*base, "train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]

    def files():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in [run, *run.rglob("*")]}

    before = files()
    for steps in (2, 1):
        again = train_cli(*base, f"train.steps={steps}")
        assert again.returncode == 0, again.stderr[-2000:]
        assert (
            f"shiq-train: nothing trained: the run in {run} is already at step 2 >= train.steps={steps}; "
            "train.steps=3 or more continues it\n"
        ) in again.stderr, again.stderr[-2000:]
        assert files() == before


def test_help_documents_the_resume_overrides():
    import yaml

    header = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())["hydra"]["help"]["header"]
    assert "+resume.allow_changed=[" in header and "+resume.force=true" in header and "OUT/config.yaml" in header
    # the groups the help lists are those shiq-train composes, every option of each (Hydra's own list named
    # configs/eval/, whose suites are shiq-eval's: eval=movie_vader_small then failed)
    template = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())["hydra"]["help"]["template"]
    listed = dict(line.split(": ", 1) for line in template.splitlines() if line.startswith(("loss: ", "model: ")))
    assert "$APP_CONFIG_GROUPS" not in template and set(listed) == {"loss", "model"}
    for group, options in listed.items():
        assert options.split(", ") == sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml")), group
    defaults = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())["defaults"]
    assert {k for d in defaults if isinstance(d, dict) for k in d if " " not in k} == set(listed)


FAILING_DRIVER = """
import sys
import shiq_train.cli as cli
import shiq_train.command_line as command_line

class Source:  # a buffer row found bad only when it is read, in the first step
    def next_micro_batches(self):
        raise ValueError("buffer B: row 3, field 'tokens': id 900 out of range")
    def state_dict(self):
        return {}
    def load_state_dict(self, s):
        pass

cli.open_data_source = lambda *a: Source()
cli.check_buffer_fits = lambda *a: None
cli.check_buffer = lambda buffer_dir, model_cfg, init: {"tokenizer": {"name": "t", "fingerprint": "0", "vocab_size": 128}}
command_line.main()
"""


def test_a_failed_start_leaves_no_half_made_run_folder(tmp_path):
    """A start that fails before its first step removes the run folder it created (and the parents it
    created), but never a folder that existed before."""
    driver = tmp_path / "driver.py"
    driver.write_text(FAILING_DRIVER)
    (tmp_path / "buffer").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def start(out):
        cmd = [sys.executable, str(driver), f"data.buffer={tmp_path / 'buffer'}", f"out={out}"]
        return subprocess.run(cmd + ["train.progress=false"], capture_output=True, text=True, cwd=REPO, env=env)

    res = start(tmp_path / "new" / "run")
    assert res.returncode == 2 and "row 3, field 'tokens'" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer", "driver.py"]

    # an empty folder the user made is a valid out= (one holding files is refused before any of this): the
    # same failure in it must leave it, not remove it as a folder of the run's own making
    (tmp_path / "mine").mkdir()
    res = start(tmp_path / "mine")
    assert res.returncode == 2 and "row 3, field 'tokens'" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    res = start(tmp_path / "other")
    assert res.returncode == 2 and "holds files but is not a shiq-train run folder" in res.stderr, res.stderr[-2000:]
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_a_corrupted_shard_is_refused_unless_checksums_are_switched_off(tmp_path):
    """data.verify_checksums (default true) hashes every shard before training reads it; false is the
    explicit opt-out for buffers verified already."""
    from shiq_data.buffer import read_manifest
    from shiq_train.cli import ConfigError, check_buffer_fits, check_plain_options, open_data_source

    write_tiny_buffer(tmp_path / "buf", False)
    shard = tmp_path / "buf" / read_manifest(tmp_path / "buf")["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # inside the last record batch's data: Arrow still reads it
    shard.write_bytes(bytes(data))
    cfg = {"buffer": str(tmp_path / "buf"), "rows_per_micro_batch": 2, "micro_batches_per_step": 1, "seed": 0}
    with pytest.raises(ValueError, match="sha256 .* differs"):
        open_data_source(cfg, "padded", "online", 0, 1, 64)
    open_data_source({**cfg, "verify_checksums": False}, "padded", "online", 0, 1, 64)
    # the checks before training read the shards too: they hashed them whatever the setting
    model = SimpleNamespace(vocab_size=128, max_sequence_length=64)
    with pytest.raises(ValueError, match="sha256 .* differs"):
        check_buffer_fits({"data": cfg, "init": "none", "out": "x"}, model, "online")
    check_buffer_fits({"data": {**cfg, "verify_checksums": False}, "init": "none", "out": "x"}, model, "online")
    with pytest.raises(ConfigError, match="data.verify_checksums='no'"):
        check_plain_options({"seed": 0, "parallel": {}, "out": "x", "data": {**cfg, "verify_checksums": "no"}})


def test_the_first_readme_command_on_a_fresh_buffer_says_in_one_line_what_to_run(tmp_path):
    """A freshly built buffer (a tokenizer of 300 tokens, rows up to 40 tokens, no reference statistics) does
    not fit the default tiny model in three ways: one line names all three and the command that fits; that
    command trains."""
    from shiq_data.buffer import write_buffer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 12 + 4 * i  # 12 .. 40 tokens
        rows.append(
            {
                "group_id": i // 2,
                "prompt_len": 4,
                "tokens": torch.randint(0, 300, (n,), generator=g).tolist(),
                "action_mask": [False] * 4 + [True] * (n - 4),
                "rewards": [0.0] * (n - 1) + [float(i % 2)],
                "source": "test",
            }
        )
    tok = {"name": "fresh", "fingerprint": "2", "vocab_size": 300}
    write_buffer(rows, tmp_path / "buf", tokenizer_info=tok, command=["test"], progress=False)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shiq_train import cli

    def run(*args):  # the command line, composed by Hydra and run in this process
        quiet = ["train.progress=false", "train.tensorboard=false", *args]
        with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base=None):
            cfg = OmegaConf.to_container(compose(config_name="train", overrides=quiet), resolve=True)
        return cli.run(cfg, cli.model_keys_given(quiet))

    with pytest.raises(cli.ConfigError) as refused:
        run(f"data.buffer={tmp_path / 'buf'}", f"out={tmp_path / 'run'}")  # the README's first command
    line = str(refused.value)
    assert "\n" not in line and cli.is_user_error(refused.value)  # printed as one line, exit status 2
    assert "'fresh' has 300 tokens" in line and "only 128" in line  # the vocabulary
    assert "longest row has 40 tokens but model.max_sequence_length=16" in line
    assert "has no reference statistics" in line
    suggested = line.split(" Run: shiq-train ", 1)[1].split(" (and your other settings)")[0].split()
    assert suggested == [
        f"data.buffer={tmp_path / 'buf'}",
        f"out={tmp_path / 'run'}",
        "model.vocab_size=384",
        "model.max_sequence_length=64",
        "train.reference=online",
    ]
    assert not (tmp_path / "run").exists()
    assert run(*suggested, "train.steps=1") == tmp_path / "run"
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]


def pretend_gpu_with_transformer_engine(monkeypatch):
    """This process sees a CUDA GPU, NCCL and Transformer Engine (none is here): ``transformer_impl=auto`` resolves
    to Transformer Engine's layers. Only for start-up checks, which refuse before building anything."""
    import importlib.util

    import torch.distributed as dist

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # a Hopper GPU
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "transformer_engine" else find_spec(name, *a)
    )


def composed(*overrides):
    """The training command line's config, composed by Hydra in this process, and its model keys."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from shiq_train import cli

    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="train", overrides=list(overrides)), resolve=True)
    return cfg, cli.model_keys_given(list(overrides))


def test_packed_rows_need_megatrons_local_layers(tmp_path, monkeypatch):
    """Transformer Engine's attention uses its causal mask type and ignores the block-diagonal mask of packed
    rows, so data.mode=packed is refused on its layers (chosen, or picked by transformer_impl=auto) in one
    line naming both settings, before any buffer is read; the local layers take packed rows."""
    from shiq_train import cli

    local = M.ModelConfig(transformer_impl="local")
    cli.check_packed_layers("packed", local)
    cli.check_packed_layers("padded", M.ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(cli.ConfigError) as refused:
        cli.check_packed_layers("packed", M.ModelConfig(transformer_impl="transformer_engine"))
    line = str(refused.value)
    assert "\n" not in line and line.startswith("data.mode=packed needs megatron's local layers")
    assert "model.transformer_impl=transformer_engine" in line
    assert "set data.mode=padded or model.transformer_impl=local" in line
    if not torch.cuda.is_available():
        cli.check_packed_layers("packed", M.ModelConfig())  # auto: local layers here
    pretend_gpu_with_transformer_engine(monkeypatch)
    args = [f"data.buffer={tmp_path / 'missing'}", f"out={tmp_path / 'run'}", "data.mode=packed"]
    for impl, shown in (("auto", "auto, which picks Transformer Engine"), ("transformer_engine", "transformer_engine")):
        with pytest.raises(cli.ConfigError, match=rf"^data.mode=packed needs .*model.transformer_impl={shown}"):
            cli.run(*composed(*args, f"model.transformer_impl={impl}"))
    assert not (tmp_path / "run").exists()
    # the same layers with padded rows pass these checks and stop only at the missing buffer
    with pytest.raises(cli.ConfigError, match="does not exist"):
        cli.run(*composed(*args[:2]))


@pytest.mark.parametrize("argv", [["--help"], ["--cfg", "job"], ["data.bufer=x"], ["loss=nope"], ["--steps=3"]])
def test_help_and_command_line_errors_answer_before_torch_is_imported(argv):
    """The command line was read after the training modules were imported: ``--help`` and a misspelt key took
    3.3 s here (seconds more where torch is read from a shared file system, once per rank under torchrun). Hydra's
    own flags and the check of the settings now come before any of them."""
    probe = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr)); "
        f"sys.argv = ['shiq-train', *{argv!r}]; runpy.run_module('shiq_train', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "torch imported: False", proc.stderr[-3000:]
    if argv[0].startswith("--") and argv[0] != "--steps=3":
        assert proc.returncode == 0 and proc.stdout, proc.stderr[-3000:]  # Hydra's help, the composed config
    else:
        assert proc.returncode == 2 and len(lines) == 2 and lines[0].startswith("shiq-train: error: command line: ")


def test_help_to_a_reader_that_goes_away_stops_quietly(tmp_path):
    """``shiq-train --help | head -1`` ended in a BrokenPipeError traceback (Hydra prints the help before any
    training code runs): it now stops with the shell's SIGPIPE status (141) and nothing on stderr."""
    line = " ".join(shlex.quote(c) for c in [sys.executable, "-m", "shiq_train", "--help"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["bash", "-c", f"{line} 2>{shlex.quote(str(tmp_path / 'err'))} | true; echo ${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.stdout.strip() == "141" and (tmp_path / "err").read_text() == "", (tmp_path / "err").read_text()


def test_override_forms_hydra_lets_through_are_refused_and_optional_sections_may_go():
    """``~loss`` and ``data=x`` ended in a KeyError or AttributeError traceback, ``=5`` in Hydra's own ValueError;
    the logging section is optional (read with its defaults), so removing it stays allowed."""
    from shiq_train.command_line import hydra_error

    assert hydra_error(["~loss"]) == "the section 'loss' was removed (~loss); training needs it"
    assert hydra_error(["data=x"]).startswith("'data' is a section of options: set its keys (data.<name>=...)")
    assert hydra_error(["=5"]) == "argument '=5' has no key: expected key=value"
    # a buffer that does not exist answers before the training's imports (seconds, more on a shared file system)
    assert hydra_error(["data.buffer=/no/such/buffer", "out=x"]) == (
        "data.buffer='/no/such/buffer' does not exist (a replay buffer directory written by shiq_data)"
    )
    assert hydra_error([f"data.buffer={REPO}", "out=x"]) is None  # (a folder that is no buffer: the run says so)
    assert hydra_error(["init=/no/such/model", "out=x"]) == (  # likewise a model folder that is not one
        "init='/no/such/model': expected none, smollm2 or a Hugging Face model folder, but /no/such/model/config.json "
        "does not exist"
    )
    assert hydra_error(["init=smollm2", "out=x"]) is None and hydra_error(["init=none", "out=x"]) is None
    for fine in (["~logging"], ["logging=null"], ["loss=copg"], ["model=tiny"], ["+resume.force=true"], ["out=x"]):
        assert hydra_error(fine) is None, fine
    assert hydra_error(["--cfg", "job"]) is None  # Hydra's own flags stay Hydra's
    assert hydra_error(["--config-name=train", "out=x"]) is None
    # another flag printed Hydra's usage block and exited 0 without training
    assert hydra_error(["--log-level", "WARNING"]) == (
        "--log-level: not an option of shiq-train, which takes key=value settings; the log level is logging.level=LEVEL"
    )
    assert hydra_error(["out=x", "--steps=3"]).startswith("--steps=3: not an option of shiq-train")
    # +foo=1 was kept in config.yaml and read by nothing; a path with ü gave Hydra's lexer error alone
    assert hydra_error(["+foo=1"]) == "+foo: 'foo' is no option of shiq-train"  # (main adds: see --help)
    # so was a key added inside a section that no code of shiq-train reads (train.eval_every: only shiq-demo's)
    assert hydra_error(["+data.foo=1"]) == "+data.foo: 'data.foo' is no option of shiq-train"
    assert hydra_error(["+parallel.tpp=2"]) == "+parallel.tpp: 'parallel.tpp' is no option of shiq-train"
    assert hydra_error(["+train.eval_every=3"]) == "+train.eval_every: 'train.eval_every' is no option of shiq-train"
    assert hydra_error(["loss=qsharp_value", "+loss.beta=1"]) == "+loss.beta: 'loss.beta' is no option of shiq-train"
    # a misspelt or misplaced key: Hydra advised +key=value, refused next; now the setting it may have meant
    assert hydra_error(["trian.lr=1e-4"]) == "trian.lr: no such setting (did you mean optimizer.lr?)"
    assert hydra_error(["loss.bta=0.1"]) == "loss.bta: no such setting (did you mean loss.beta?)"
    assert hydra_error(["zzz.qqq=1"]) == "zzz.qqq: no such setting"
    # among the keys of the group the command line chooses, not the default one's
    assert (
        hydra_error(["loss=qsharp_value", "loss.num_atom=3"])
        == "loss.num_atom: no such setting (did you mean loss.num_atoms?)"
    )
    assert "quote such a value: key='value'" in hydra_error(["out=runs/ünicode"])
    assert hydra_error(["out='runs/ünicode'"]) is None


def test_a_command_line_with_config_dir_is_checked_among_its_groups(tmp_path):
    """--config-dir DIR (a folder of one's own config groups) made the check leave the whole line to Hydra: a
    misspelt key got Hydra's multi-line error and status 1. The line is now checked with DIR's groups searched
    too, as Hydra searches them."""
    from shiq_train.command_line import hydra_error

    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "mine.yaml").write_text("name: shiq\nbeta: 0.2\nnum_steps: 3\n")
    d = str(tmp_path)
    for fine in (["--config-dir", d, "loss=mine", "loss.num_steps=4"], [f"--config-dir={d}", "loss=mine"], ["-cd", d]):
        assert hydra_error(fine) is None, fine
    assert hydra_error(["--config-dir", d, "loss=mine", "trian.steps=3"]) == (
        "trian.steps: no such setting (did you mean train.steps?)"
    )
    assert hydra_error(["-cd", d, "loss=mine", "loss.num_step=4"]) == (
        "loss.num_step: no such setting (did you mean loss.num_steps?)"  # among the keys of DIR's group
    )
    assert hydra_error(["--config-dir", d, "loss=mine", "+loss.other=1"]) == (
        "+loss.other: 'loss.other' is no option of shiq-train"
    )
    assert "Could not find 'loss/theirs'" in hydra_error(["--config-dir", d, "loss=theirs"])
    assert hydra_error(["--config-dir", str(tmp_path / "none"), "out=x"]) == (
        f"--config-dir {tmp_path / 'none'}: no such folder"
    )
    assert hydra_error(["out=x", "--config-dir"]).startswith("--config-dir needs a folder")
    assert hydra_error(["--config-dir", d, "--cfg", "job"]) is None  # Hydra's own flags stay Hydra's


def test_a_config_dir_group_file_that_is_not_yaml_is_refused_in_one_line_naming_it(tmp_path):
    """A group file of --config-dir's that PyYAML cannot read (an unclosed list, a tab) ended the command in
    PyYAML's traceback, exit status 1; it is refused in one line naming the file, its line and column."""
    from shiq_train.command_line import hydra_error

    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "list.yaml").write_text("name: shiq\nbeta: [0.2\n")
    (tmp_path / "loss" / "tab.yaml").write_text("name: shiq\n\tbeta: 0.2\n")
    d = str(tmp_path)
    assert hydra_error(["--config-dir", d, "loss=list"]) == (
        f"{tmp_path / 'loss' / 'list.yaml'}: line 3, column 1: not valid YAML (expected ',' or ']', but got "
        "'<stream end>')"
    )
    assert hydra_error(["--config-dir", d, "loss=tab"]) == (
        f"{tmp_path / 'loss' / 'tab.yaml'}: line 2, column 1: not valid YAML (found character '\\t' that cannot "
        "start any token)"
    )
    # a control character (PyYAML's ReaderError has no line and column, only a character index): named alike
    (tmp_path / "loss" / "bell.yaml").write_text("name: shiq\nbeta: 0.1\a\n")
    assert hydra_error(["--config-dir", d, "loss=bell"]) == (
        f"{tmp_path / 'loss' / 'bell.yaml'}: line 2, column 10: not valid YAML (unacceptable character #x0007: "
        "special characters are not allowed)"
    )
    # a file not in UTF-8 (Latin-1's é): Hydra's line named no file
    (tmp_path / "loss" / "latin.yaml").write_bytes("name: shiq\n# beta for caf\u00e9\nbeta: 0.2\n".encode("latin-1"))
    assert hydra_error(["--config-dir", d, "loss=latin"]) == (
        f"{tmp_path / 'loss' / 'latin.yaml'}: line 2: not valid YAML (not UTF-8 text: byte 0xe9, invalid "
        "continuation byte)"
    )


def test_a_config_dir_group_file_named_as_a_packaged_option_is_refused_unless_it_is_a_copy(tmp_path):
    """DIR/loss/shiq.yaml (the packaged loss copied to change its beta) was never read: Hydra finds the packaged
    loss/shiq.yaml first on its search path, so the run trained with the packaged beta and said nothing. Such a
    file is refused when chosen (by name or as the default) unless it holds the packaged settings."""
    from shiq_train.command_line import CONFIG_DIR, hydra_error

    for group in ("loss", "model"):
        (tmp_path / group).mkdir()
    (tmp_path / "loss" / "shiq.yaml").write_text("name: shiq\nbeta: 0.3\ngamma: 1.0\n")
    d, mine = str(tmp_path), tmp_path / "loss" / "shiq.yaml"
    refusal = (
        f"--config-dir {d}: {mine} is not read: loss=shiq is the packaged option of that name, which Hydra finds "
        "first; give your file another name and choose it (loss=my_shiq), or, to resume a run started with it, "
        "leave out --config-dir (the run trained without the file)"
    )
    assert hydra_error(["--config-dir", d, "loss=shiq"]) == refusal
    assert hydra_error(["-cd", d, "out=x"]) == refusal  # (loss=shiq is the default)
    assert hydra_error(["--config-dir", d, "loss=dpo"]) is None  # (not chosen)
    # a copy of the packaged file, comments aside, is read alike
    (tmp_path / "model" / "tiny.yaml").write_text((CONFIG_DIR / "model" / "tiny.yaml").read_text() + "# mine\n")
    assert hydra_error(["--config-dir", d, "loss=dpo"]) is None
    assert hydra_error(["--config-dir", str(CONFIG_DIR), "out=x"]) is None  # (the packaged folder itself)


@pytest.mark.parametrize("arg", ["logging.wandb=true", "train.log_every=10"])
def test_a_value_run_refuses_policy_run_settings_it_does_not_read(tmp_path, arg):
    """loss=qsharp_value writes no W&B run, saves once at the end and logs every step: these settings were accepted
    and changed nothing."""
    import re

    from shiq_train.cli import ConfigError, run

    cfg, keys = composed(
        f"data.buffer={tmp_path / 'b'}", f"out={tmp_path / 'o'}", "init=somewhere", "loss=qsharp_value"
    )
    key, value = arg.split("=")
    section, option = key.split(".")
    cfg[section][option] = value == "true" or int(value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*loss=qsharp_value does not read it"):
        run(cfg, keys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arg", ["parallel.cp=2", "parallel.vpp=2"])
def test_a_value_run_refuses_parallel_sizes_it_does_not_use(tmp_path, arg):
    """loss=qsharp_value trains in one process: context parallelism (a GPU path) and virtual pipeline stages were
    accepted, recorded in value_model.json and not used."""
    from shiq_train.cli import ConfigError, run

    cfg, keys = composed(
        f"data.buffer={tmp_path / 'b'}", f"out={tmp_path / 'o'}", "init=somewhere", "loss=qsharp_value", arg
    )
    with pytest.raises(ConfigError, match=rf"^loss=qsharp_value trains in one process: .*\(got {arg}\)$"):
        run(cfg, keys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("loss.gamma=0.9", "loss.gamma must be 1, got 0.9: "),
        ("optimizer.min_lr=1e-6", "optimizer.min_lr=1e-06 is never reached with optimizer.decay_steps=0 "),
    ],
)
def test_a_value_runs_own_settings_are_refused_before_the_reference_is_loaded(tmp_path, monkeypatch, arg, message):
    """loss=qsharp_value refused loss.gamma=0.9 (and a min_lr never reached) only once SmolLM2's weights were
    loaded: seconds, for a setting read from the command line alone."""
    from shiq_train import cli

    def load_init(init):
        raise AssertionError(f"the reference {init} was loaded")

    monkeypatch.setattr(cli, "load_init", load_init)
    (tmp_path / "b").mkdir()
    cfg, keys = composed(
        f"data.buffer={tmp_path / 'b'}",
        f"out={tmp_path / 'o'}",
        "init=smollm2",
        "model=smollm2_135m",
        "loss=qsharp_value",
        arg,
    )
    with pytest.raises(ValueError) as refused:
        cli.run(cfg, keys)
    assert str(refused.value).startswith(message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [3, True, 0.5])
def test_an_init_hydra_read_as_a_number_is_refused_naming_init(value):
    """init=3 (a folder named 3, unquoted) reached Path(3): a TypeError traceback and exit status 1."""
    from shiq_train.cli import ConfigError, check_plain_options

    cfg, _ = composed("data.buffer=b", "out=o", f"init={value}")
    assert cfg["init"] == value  # (Hydra's reading of the unquoted value)
    with pytest.raises(ConfigError, match=rf"^init={value!r}: expected none, smollm2 or a Hugging Face model folder"):
        check_plain_options(cfg)


def test_a_min_lr_without_decay_steps_is_refused(tmp_path):
    """optimizer.min_lr=1e-5 with decay_steps=0 trained at a constant lr: the setting changed nothing."""
    from shiq_train.cli import ConfigError, run

    cfg, keys = composed(f"data.buffer={tmp_path}", f"out={tmp_path / 'o'}", "optimizer.min_lr=1e-5")
    with pytest.raises(ConfigError, match=r"^optimizer.min_lr=1e-05 is never reached with optimizer.decay_steps=0"):
        run(cfg, keys)
    cfg["optimizer"]["decay_steps"] = 10  # (then it is the end of the decay)
    with pytest.raises(Exception) as e:  # refused further on, for another reason: the folder is no buffer
        run(cfg, keys)
    assert "manifest.json not found" in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["seed", "data.seed"])
def test_a_negative_seed_is_refused_naming_its_key(key):
    from shiq_train.cli import ConfigError, check_plain_options

    cfg, _ = composed("data.buffer=b", "out=o")
    section = cfg["data"] if key == "data.seed" else cfg
    section[key.split(".")[-1]] = -1
    with pytest.raises(ConfigError, match=rf"{key}=-1: expected an integer >= 0"):
        check_plain_options(cfg)


@pytest.mark.parametrize("given", [None, "data.seed"])
def test_a_data_seed_of_2_to_the_32_or_more_is_refused_naming_data_seed(given):
    """numpy draws epoch ``e`` from ``[data.seed, e]`` and reads ``5 + 2**32`` as the words ``[5, 1]``: that
    seed's order was seed 5's epoch 1. Refused, naming data.seed whether given or following ``seed``."""
    from shiq_train.cli import ConfigError, check_plain_options

    overrides = ["data.buffer=b", "out=o", f"seed={5 + 2**32}"]
    cfg, _ = composed(*overrides, *([f"data.seed={5 + 2**32}", "seed=0"] if given else []))
    with pytest.raises(ConfigError, match=rf"^data.seed={5 + 2**32}: expected an integer below 2\*\*32"):
        check_plain_options(cfg)
    cfg, _ = composed(*overrides, f"data.seed={2**32 - 1}")  # (seed itself may be larger: torch takes 64 bits)
    check_plain_options(cfg)


def test_multirun_is_refused_before_hydra_makes_its_folders(tmp_path):
    """``shiq-train --multirun loss.beta=0.1,0.2 ...`` made ./multirun/DATE/TIME/ in the working folder and
    stopped the sweep at the first failing job: refused in one line saying how to sweep, nothing made."""
    for flag in ("--multirun", "-m"):
        res = subprocess.run(
            [sys.executable, "-m", "shiq_train", flag, "loss.beta=0.1,0.2", "out=x"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"{flag}: shiq-train runs one job" in res.stderr and "loss.beta=$b" in res.stderr
        assert list(tmp_path.iterdir()) == []


def test_resume_allow_changed_naming_no_key_of_the_configuration_is_refused(tmp_path):
    """``+resume.allow_changed=[loss.betta]`` accepted nothing and said nothing: the resume was then refused
    for loss.beta, or went on with a silently ignored option."""
    import yaml

    from shiq_train.cli import ConfigError, check_resume_config

    cfg = {"loss": {"name": "shiq", "beta": 0.1}, "train": {"steps": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    new = {"loss": {"name": "shiq", "beta": 0.5}, "train": {"steps": 3}}
    assert check_resume_config(tmp_path, new, {"loss.beta"}, False) == ["loss.beta"]
    for typo in ("loss.betta", "loss"):  # a section is not a key either
        with pytest.raises(ConfigError, match=f"allow_changed names '{typo}', which is not a key"):
            check_resume_config(tmp_path, new, {"loss.beta", typo}, False)


def test_a_cut_or_damaged_config_yaml_is_refused_as_such_not_as_an_older_release(tmp_path):
    """A config.yaml cut short (head -c 100) was compared as an older release's: one line of ~40 "(unset) -> ..."
    keys and advice to allow them all. Lacking most sections (or not a mapping), it is named as damaged with where
    its copy is: the newest checkpoint's meta.json; a config lacking one section is an older release's still."""
    import yaml

    from shiq_train.cli import ConfigError, check_resume_config

    cfg, _ = composed("data.buffer=b", f"out={tmp_path}", "loss=sft")
    text = yaml.safe_dump(cfg, sort_keys=False)
    (tmp_path / "config.yaml").write_text(text[:100])
    assert list(yaml.safe_load(text[:100])) == ["model"]  # (cut inside the model section)

    def refusal():
        with pytest.raises(ConfigError) as e:
            check_resume_config(tmp_path, cfg, set(), False)
        return str(e.value)

    path = tmp_path / "config.yaml"
    lacks = f"{path}: it lacks 6 of the 7 sections (loss, parallel, data, optimizer, train, logging): "
    assert refusal() == f"{lacks}the file looks truncated or damaged; restore it from a copy, or use another out="
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    meta = {"step": 2, "layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": {"config": cfg}}
    (step / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    restore = (
        f"the file looks truncated or damaged; restore it from the 'config' of the 'meta' object in {step}/meta.json "
        "(the configuration its checkpoint was saved with), or use another out="
    )
    assert refusal() == lacks + restore
    path.write_text("just text\n")
    assert refusal() == f"{path}: expected a mapping of options, got str: {restore}"
    path.write_text('model: "cut\n')
    assert refusal().startswith(f"{path}: not valid YAML (") and refusal().endswith(restore)
    # an older release's: one section short, its keys compared as before
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "logging"}))
    changed = check_resume_config(tmp_path, cfg, set(), False)  # (logging's keys may change on resume)
    assert changed == sorted(f"logging.{k}" for k in cfg["logging"])
    older = {k: v for k, v in cfg.items() if k not in ("logging", "parallel")}
    path.write_text(yaml.safe_dump({**older, "optimizer": {**cfg["optimizer"], "lr": 1.0}}))
    assert "optimizer.lr 1.0 -> 0.0003" in refusal()


def test_run_folder_lock_applied_resume_changes_and_untouched_config_on_refusal(tmp_path):
    """Four holes of a rerun into a run folder:
    - a second run into a folder that a run is training into is refused (two runs used to alternate
      checkpoints of two configurations in one folder);
    - a learning rate accepted on resume is the one used (the checkpoint's came back and was logged as new);
    - a run with config.yaml but no checkpoint (stopped early) is compared with it, not overwritten;
    - a metrics.jsonl that cannot be resumed is refused before config.yaml is rewritten."""
    import fcntl

    import yaml

    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    run = tmp_path / "run"
    base = [f"data.buffer={tmp_path / 'buf'}", f"out={run}", "data.rows_per_micro_batch=2"]
    run.mkdir()
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = train_cli(*base, "train.steps=2")
    assert busy.returncode == 2 and ".lock is held by another shiq-train run, training into" in busy.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # and the folder is free again once released

    first = train_cli(*base, "train.steps=2", "optimizer.warmup_steps=0", "optimizer.decay_steps=0")
    assert first.returncode == 0, first.stderr[-2000:]
    faster = train_cli(
        *base, "train.steps=4", "optimizer.warmup_steps=0", "optimizer.decay_steps=0", "optimizer.lr=0.01",
        "+resume.allow_changed=[optimizer.lr]",
    )  # fmt: skip
    assert faster.returncode == 0, faster.stderr[-2000:]
    assert [m["lr"] for m in metrics(run)] == pytest.approx([3e-4, 3e-4, 0.01, 0.01])

    saved = (run / "config.yaml").read_bytes()
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    now = ["optimizer.warmup_steps=0", "optimizer.decay_steps=0", "optimizer.lr=0.01"]  # as config.yaml says
    bad_log = train_cli(*base, *now, "train.steps=5", "loss.beta=0.7", "+resume.allow_changed=[loss.beta]")
    assert bad_log.returncode == 2 and "metrics.jsonl: line 5: not a metrics record" in bad_log.stderr
    assert (run / "config.yaml").read_bytes() == saved

    shutil.rmtree(run / "checkpoints")  # as a run stopped before its first checkpoint leaves it
    (run / "metrics.jsonl").write_text(
        "".join(ln + "\n" for ln in (run / "metrics.jsonl").read_text().splitlines()[:2])
    )
    other = train_cli(*base, *now, "train.steps=2", "loss.beta=0.5")
    assert other.returncode == 2 and "loss.beta 0.1 -> 0.5" in other.stderr, other.stderr[-2000:]
    assert "a new start would replace its log of 2 steps" in other.stderr
    assert (run / "config.yaml").read_bytes() == saved and len(metrics(run)) == 2
    assert yaml.safe_load(saved)["optimizer"]["lr"] == 0.01
    again = train_cli(*base, *now, "train.steps=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "has no checkpoint: training again from step 0" in again.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2]
    # a start that got no step logged (killed at once, out of memory) retries with any configuration
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").write_text("")
    retry = train_cli(*base, *now, "train.steps=2", "loss.beta=0.5")
    assert retry.returncode == 0, retry.stderr[-2000:]


def test_reference_statistics_of_another_model_than_init_are_warned_of(tmp_path):
    """Statistics computed with one model and a run started from another (or from random weights) trained
    without a word: at step 1 log_ratio was -0.33 instead of 0. A warning names both; the same model, online
    statistics, and statistics of a training checkpoint say nothing."""
    from shiq_train.cli import reference_mismatch

    (tmp_path / "a").mkdir()
    manifest = {"ref_model": {"model": str((tmp_path / "a").resolve()), "tokenizer": "f"}}
    assert reference_mismatch(manifest, str(tmp_path / "a"), "precomputed", "buf") is None
    assert reference_mismatch(manifest, str(tmp_path / "b"), "online", "buf") is None
    msg = reference_mismatch(manifest, str(tmp_path / "b"), "precomputed", "buf")
    assert msg.startswith(f"buf: its reference statistics were computed with {(tmp_path / 'a').resolve()}, but init=")
    assert "init=none starts from random weights" in reference_mismatch(manifest, "none", "precomputed", "buf")
    smol = {"ref_model": {"model": "smollm2"}}
    assert reference_mismatch(smol, "smollm2", "precomputed", "buf") is None
    checkpoint = {"ref_model": {**manifest["ref_model"], "megatron_checkpoint": "/x/step_1"}}
    assert reference_mismatch(checkpoint, "none", "precomputed", "buf") is None
    assert reference_mismatch({"ref_model": None}, "none", "precomputed", "buf") is None
    # a copy of the model at another path holds the same weights, by the recorded SHA-256: no warning
    from shiq_data.io import sha256_files, weight_files

    (tmp_path / "a" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"weights")
    record = {**manifest["ref_model"], "sha256": sha256_files(weight_files(tmp_path / "a"))}
    assert reference_mismatch({"ref_model": record}, str(tmp_path / "copy"), "precomputed", "buf") is None
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"other weights")
    assert "is another model" in reference_mismatch({"ref_model": record}, str(tmp_path / "copy"), "precomputed", "buf")


def test_ref_stats_warns_of_rows_longer_than_the_reference_context(tmp_path):
    """A 44-token row scored by a model of 16 positions was stored without a word."""
    from types import SimpleNamespace

    from shiq_data.buffer import open_buffer
    from shiq_train.reference import context_warning, longest_row

    write_tiny_buffer(tmp_path / "buf", with_ref=False)
    n = longest_row(tmp_path / "buf")
    assert n == max(len(r["tokens"]) for r in open_buffer(tmp_path / "buf").table.to_pylist())  # row by row
    assert context_warning(tmp_path / "buf", SimpleNamespace(max_position_embeddings=n), "m") is None
    assert context_warning(tmp_path / "buf", SimpleNamespace(), "m") is None
    warning = context_warning(tmp_path / "buf", SimpleNamespace(max_position_embeddings=n - 1), "m")
    assert f"its longest row has {n} tokens, more than the {n - 1} positions of m" in warning


def test_an_out_that_cannot_be_made_is_named_as_out(tmp_path):
    """out= under a folder without write permission (here /proc) gave "[Errno 2] No such file or directory",
    naming no setting."""
    import contextlib

    from shiq_train.cli import ConfigError, lock_run_folder

    with contextlib.ExitStack() as held, pytest.raises(ConfigError, match=r"^out=/proc/x/run: cannot be made \("):
        lock_run_folder(held, Path("/proc/x/run"))


def test_library_notices_every_rank_repeated_are_hidden_on_cpu():
    """Under torchrun every rank printed megatron's advice to set CUDA_DEVICE_MAX_CONNECTIONS (for GPUs), torch's
    deprecations of the collectives megatron's distributed optimizer calls, and a warning on its zeroing of
    shard gradients: none the user can act on. Hidden once a gloo process group starts; other warnings stay."""
    given = (
        "When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `x` instead.",
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `y` instead.",
        "a warning of our own",
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with parallel.distributed(seed=3):
            for message in given:
                warnings.warn(message, FutureWarning if "deprecated" in message else UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen if str(w.message) in given] == ["a warning of our own"]


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"hidden_size": "x"}, "Field 'hidden_size' expected int, got str"),  # (transformers' StrictDataclassError)
        ({"num_attention_heads": 0}, "division or modulo by zero"),  # (a ZeroDivisionError in transformers' config)
    ],
)
def test_an_init_folder_whose_config_json_transformers_refuses_is_one_line(tmp_path, edit, needle):
    """A config.json of a bad field in an init folder ended in transformers' traceback (exit status 1)."""
    folder = tmp_path / "llama"
    folder.mkdir()
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96}
    (folder / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": 2, "num_attention_heads": 4, **edit})
    )
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", f"init={folder}")
    assert res.returncode == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"shiq-train: error: init='{folder}': {folder / 'config.json'}: ") and needle in line, line


def test_a_config_dir_with_a_comma_or_beside_a_searchpath_override_is_checked_as_hydra_reads_it(tmp_path):
    """The check added --config-dir's folder as ``hydra.searchpath=[file://DIR]``, after the line: a folder whose
    path has a comma was read as two folders, and one the line also gave its own ``hydra.searchpath=[...]`` for
    lost to it (Hydra reads only the first such override), so a group of DIR Hydra finds was refused ("Could not
    find 'loss/mine'", status 2). Both are now searched, each folder one quoted path."""
    from shiq_train.command_line import hydra_error

    mine, theirs = tmp_path / "my configs, v2", tmp_path / "theirs"
    for d, group in ((mine, "loss"), (theirs, "model")):
        (d / group).mkdir(parents=True)
    (mine / "loss" / "mine.yaml").write_text("name: shiq\nbeta: 0.2\nnum_steps: 3\n")
    (theirs / "model" / "other.yaml").write_text("name: other\n")
    assert hydra_error(["--config-dir", str(mine), "loss=mine"]) is None
    extra = f"hydra.searchpath=[file://{theirs}]"
    assert hydra_error(["--config-dir", str(mine), "loss=mine", extra]) is None
    assert hydra_error([extra, "-cd", str(mine), "loss=mine", "loss.num_step=4"]) == (
        "loss.num_step: no such setting (did you mean loss.num_steps?)"
    )


def four_row_gpt2_buffer(out: Path) -> Path:
    """A buffer at ``out`` of four GPT-2 rows, two prompts with rewards 1 and -1 (built through shiq-data)."""
    from data_cli_runs import write_jsonl

    from shiq_data.cli import main as data_main

    rows = [{"prompt": f"Say {w}.", "completion": f" {w} {w}", "reward": r} for w, r in [("a", 1), ("b", -1)] * 2]
    given = write_jsonl(out.parent / "in.jsonl", rows)
    assert data_main(["build", "jsonl", str(given), "--tokenizer", "gpt2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_a_log_level_above_info_shows_no_progress_bar_in_training_ref_stats_export_and_evaluation(tmp_path):
    """``logging.level=WARNING`` (``--log-level WARNING`` for the subcommands and ``shiq-eval``) keeps warnings
    only, as the README and every ``--log-level`` help say, and as ``shiq-data`` does: the training bar, the
    reference statistics' bar, ``shiq-eval run``'s, and transformers' own ("Loading weights", "Writing model
    shards") were all still drawn."""
    four_row_gpt2_buffer(tmp_path / "buf")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Say a."}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("SHIQ_VERBOSE", None)
    run, hf = tmp_path / "run", tmp_path / "hf"
    commands = [
        [
            "-m",
            "shiq_train",
            f"data.buffer={tmp_path / 'buf'}",
            f"out={run}",
            "model.vocab_size=50304",
            "train.reference=online",
            "train.steps=1",
            "train.tensorboard=false",
            "logging.level=WARNING",
        ],
        ["-m", "shiq_train", "export", str(run), "--hf", str(hf), "--log-level", "WARNING"],
        ["-m", "shiq_train", "ref-stats", str(tmp_path / "buf"), "--model", str(hf), "--log-level", "WARNING"],
        [
            "-m",
            "shiq_eval.cli",
            "--log-level",
            "WARNING",
            "run",
            str(hf),
            "--out",
            str(tmp_path / "eval"),
            "--reference",
            str(hf),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--scorer",
            "vader",
            "--max-new-tokens",
            "2",
        ],
    ]
    for argv in commands:
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr == "", (argv[:3], proc.stderr[-3000:])


def test_train_progress_false_shows_no_progress_bar_of_transformers_either(tmp_path):
    """``train.progress=false`` asks for no progress bar, as ``shiq-data --no-progress`` and ``shiq-eval run
    --quiet`` do: a run started from a Hugging Face folder still drew transformers' "Loading weights" bar."""
    four_row_gpt2_buffer(tmp_path / "buf")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("SHIQ_VERBOSE", None)
    common = [f"data.buffer={tmp_path / 'buf'}", "train.reference=online", "train.steps=1", "train.tensorboard=false"]
    argvs = [
        ["-m", "shiq_train", *common, f"out={tmp_path / 'run'}", "model.vocab_size=50304", "logging.level=WARNING"],
        ["-m", "shiq_train", "export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf"), "--log-level", "WARNING"],
        ["-m", "shiq_train", *common, f"out={tmp_path / 'from_hf'}", f"init={tmp_path / 'hf'}", "train.progress=false"],
    ]
    for argv in argvs:
        proc = commands.run([sys.executable, *argv], cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[-3000:]
    assert "shiq-train: shiq on" in proc.stdout  # the result line stays


def test_an_unknown_group_option_lists_the_others_in_one_readable_line():
    """Hydra lists a group's options one a line under "Available options in 'loss':"; joined with "; " the line
    read "Available options in 'loss':; copg; dpo; ...", which the one-line error now gives as a list."""
    from shiq_train.command_line import hydra_error

    assert hydra_error(["model=nosuch"]) == (
        "In 'train': Could not find 'model/nosuch'; Available options in 'model': smollm2_135m, tiny"
    )
    assert hydra_error(["loss=nosuch"]).endswith(
        "Available options in 'loss': copg, dpo, dro_v, dro_v_loo, mt_copg, mt_dpo, qsharp_value, sft, shiq, "
        "shiq_init, shiq_ms, shiq_tk"
    )


def test_a_bfloat16_run_gives_no_warning_of_its_float32_norm_weights(tmp_path):
    """Every bfloat16 run (SmolLM2's config) printed torch's "Mismatch dtype between input and weight: input dtype
    = c10::BFloat16, weight dtype = float" at its first step: megatron-core keeps the local norms' weights in
    float32. Harmless (torch normalises in float32 and rounds once to bfloat16, as a mixed-precision norm does),
    so hidden, and only it: the run is otherwise as before, with Python's default warning filters."""
    write_tiny_buffer(tmp_path / "buf", with_ref=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [f"data.buffer={tmp_path / 'buf'}", "loss=sft", "train.steps=1", "data.rows_per_micro_batch=2"]
    cmd = [sys.executable, "-m", "shiq_train", "model=tiny", "model.params_dtype=bfloat16", "train.progress=false"]
    res = subprocess.run(
        [*cmd, "train.tensorboard=false", *args, f"out={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Mismatch dtype" not in res.stderr and "Warning" not in res.stderr, res.stderr[-2000:]


def test_a_bfloat16_input_with_float32_norm_weights_is_normalised_in_float32():
    """Why that warning is hidden: torch's RMSNorm of a bfloat16 input with a float32 weight (the non-fused path
    it warns of) normalises and scales in float32 and rounds once to bfloat16, the input's dtype: exactly the
    float32 result rounded, not the coarser all-bfloat16 computation."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(16, 576, generator=g)).bfloat16()
    w = 1 + 0.1 * torch.randn(576, generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=M.MIXED_NORM_WARNING)
        out = F.rms_norm(x, (576,), w, 1e-5)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
