"""``shiq-train`` under other parallel layouts, through the commands a user types (console script, torchrun).

- Data parallelism changed on resume: a run launched with ``torchrun --nproc_per_node 2`` (DP=2, one micro-batch
  per rank) for 3 steps is resumed by ``shiq-train`` in one process (DP=1, two micro-batches: the same global
  batch) for 3 more, through the command line's resume checks (``data.micro_batches_per_step`` may change
  exactly when the global batch stays); its 6 losses and gradient norms equal an uninterrupted single-process
  run's (relative 1e-5, the parity tests' tolerance).
- Interleaved pipeline stages (slow: 4 processes with Hugging Face imports; the quick variants are the
  Trainer's in ``tests/test_interleaved_stages.py`` and the refusals below): ``parallel.pp=2 parallel.vpp=2``
  under torchrun trains a 4-layer model (from a Hugging Face folder, so that both layouts start from the same
  weights; online reference, a frozen copy of the chunks) with the single-process run's losses and gradient
  norms.
- ``parallel.vpp`` settings the layout cannot run are refused in one line naming the keys.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_cli import REPO, metrics, write_tiny_buffer

from shiq_train.cli import ConfigError, parallel_config
from shiq_train.model import ModelConfig
from shiq_train.parallel import free_port

BIN = Path(sys.executable).parent
TOL = 1e-5


def shiq_train(*args, nproc=1, timeout=300):
    """``shiq-train ARGS`` in one process, or ``torchrun --nproc_per_node N -m shiq_train ARGS``."""
    if nproc == 1:
        launcher = [str(BIN / "shiq-train")]
    else:
        launcher = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
        launcher += ["-m", "shiq_train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = launcher + ["train.progress=false", "train.tensorboard=false", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _layout(run, step):
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())["layout"]


def _close(got, want, key):
    a, b = [m[key] for m in got], [m[key] for m in want]
    assert len(a) == len(b) and a == pytest.approx(b, rel=TOL), (key, a, b)


def test_a_torchrun_dp2_run_resumes_in_one_process_with_the_uninterrupted_losses(tmp_path):
    write_tiny_buffer(tmp_path / "buf", with_ref=True)
    common = [
        f"data.buffer={tmp_path / 'buf'}",
        "data.rows_per_micro_batch=2",
        "model.num_layers=4",
        "seed=5",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.1",
        "optimizer.warmup_steps=1",
        "optimizer.decay_steps=5",
    ]
    straight = shiq_train(*common, f"out={tmp_path / 'straight'}", "train.steps=6", "data.micro_batches_per_step=2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "run"
    dp2 = shiq_train(*common, f"out={run}", "train.steps=3", "data.micro_batches_per_step=1", nproc=2)
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    assert _layout(run, 3) == {"tp": 1, "pp": 1, "dp": 2}

    resumed = shiq_train(*common, f"out={run}", "train.steps=6", "data.micro_batches_per_step=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr
    got, want = metrics(run), metrics(tmp_path / "straight")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    _close(got, want, "loss")
    _close(got, want, "grad_norm")
    assert _layout(run, 6) == {"tp": 1, "pp": 1, "dp": 1}


def save_llama(folder, layers=4):
    """A tiny Llama (GQA) saved by transformers: the initial weights of both layouts."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


@pytest.mark.slow
def test_interleaved_stages_from_the_command_line_train_like_one_process(tmp_path):
    write_tiny_buffer(tmp_path / "buf", with_ref=False)
    save_llama(tmp_path / "llama")
    common = [
        f"data.buffer={tmp_path / 'buf'}",
        f"init={tmp_path / 'llama'}",
        "train.reference=online",
        "train.steps=3",
        "data.rows_per_micro_batch=2",
        "data.micro_batches_per_step=2",
        "optimizer.lr=3e-3",
        "optimizer.clip_grad=0",
    ]
    one = shiq_train(*common, f"out={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    vpp = shiq_train(*common, f"out={tmp_path / 'vpp'}", "parallel.pp=2", "parallel.vpp=2", nproc=2)
    assert vpp.returncode == 0, vpp.stderr[-3000:]
    got, want = metrics(tmp_path / "vpp"), metrics(tmp_path / "one")
    _close(got, want, "loss")
    _close(got, want, "grad_norm")
    assert got[-1]["loss"] != got[0]["loss"]  # it trained
    assert _layout(tmp_path / "vpp", 3) == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}


@pytest.mark.parametrize(
    "section, layers, micro_batches, message",
    [
        ({"pp": 1, "vpp": 2}, 4, 2, "parallel.vpp (virtual_pipeline_model_parallel_size) = 2 interleaves pipeline "),
        ({"pp": 2, "vpp": 2}, 6, 2, "model.num_layers=6 must be divisible by the number of (virtual) pipeline stages "),
        ({"pp": 2, "vpp": 2}, 4, 3, "data.micro_batches_per_step=3 a multiple of parallel.pp=2: use data.micro_ba"),
        ({"pp": 3, "vpp": 1}, 4, 3, "model.num_layers=4 must be divisible by the number of (virtual) pipeline stag"),
        (
            {"pp": 3, "vpp": 1},
            4,
            3,
            "stages parallel.pp = 3: every stage holds as many layers (1, 2, 4 stages divide it)",
        ),
    ],
)
def test_layouts_that_cannot_run_are_refused_in_one_line(section, layers, micro_batches, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it
    with pytest.raises(ConfigError) as e:
        parallel_config({"tp": 1, "cp": 1, **section}, ModelConfig(num_layers=layers), micro_batches)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert parallel_config({"tp": 1, "pp": 2, "cp": 1, "vpp": 2}, ModelConfig(num_layers=4), 4)


@pytest.mark.parametrize(
    "section, model, message",
    [
        (
            {"tp": 2},
            {"hidden_size": 48, "num_attention_heads": 3},
            "model.num_attention_heads=3 must be divisible by the tensor-parallel size 2 (parallel.tp: 1 or 3 divide",
        ),
        (
            {"tp": 8},
            {},
            "model.num_attention_heads=4 must be divisible by the tensor-parallel size 8 (parallel.tp: 1, 2",
        ),
        (
            {"tp": 2},
            {"vocab_size": 255},
            "model.vocab_size=255 must be divisible by the tensor-parallel size 2 (parallel.tp; or pad the vocabulary to 256)",
        ),
        # (an odd intermediate_size: megatron-core's own AssertionError named neither the key nor a size that works)
        (
            {"tp": 2},
            {"ffn_hidden_size": 97},
            "model.ffn_hidden_size=97 must be divisible by the tensor-parallel size 2 (parallel.tp: 1 or 97 divide it)",
        ),
        ({"tp": 1}, {"num_layers": 3, "recompute": "full", "recompute_num_layers": 2}, "model.recompute_num_layers=2 "),
        (
            {"pp": 2},
            {"num_layers": 4, "recompute": "full", "recompute_num_layers": 3},
            "divide the 2 layers of a pipel",
        ),
        (
            {"tp": 1, "backend": "nccl"},
            {},
            "parallel.backend=nccl needs a CUDA GPU and NCCL, but no CUDA GPU is visible",
        ),
        ({"tp": 1, "backend": "mpi"}, {}, "parallel.backend must be one of ['auto', 'gloo', 'nccl'], got 'mpi'"),
        ({"tp": 1, "timeout_minutes": 0}, {}, "parallel.timeout_minutes must be a number of minutes > 0, got 0"),
        # sequence parallelism: refused here, not after the process groups started and the data was opened
        (
            {"tp": 1},
            {"sequence_parallel": True},
            "model.sequence_parallel=true needs tensor parallelism (parallel.tp > 1)",
        ),
        (
            {"tp": 2},
            {"sequence_parallel": True, "max_sequence_length": 15},
            "needs model.max_sequence_length=15 divisible by the tensor-parallel size 2 (e.g. 16)",
        ),
        ({"tp": 2}, {}, "parallel.tp x parallel.pp = 2 x 1 needs a multiple of 2 processes, but this run has 1 (WORLD"),
    ],
)
def test_layouts_the_model_or_machine_cannot_run_are_refused_before_any_process_group(
    section, model, message, monkeypatch
):
    """Checked by ``parallel_config`` from the configuration and ``WORLD_SIZE`` alone, before megatron-core's own
    checks (whose messages name no key: ``num_attention_heads (3) must be a multiple of ...``) or the recompute
    loop's IndexError at the first forward; this machine has no GPU, so nccl cannot run here."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError) as e:
        parallel_config({"tp": 1, "pp": 1, "cp": 1, **section}, ModelConfig(**model), 2)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()
    # the same layouts where they can run: block recompute takes any count, two processes fill tp=2, gloo is the CPU's
    cfg = ModelConfig(num_layers=3, recompute="full", recompute_method="block", recompute_num_layers=2)
    assert parallel_config({"tp": 1, "pp": 1, "cp": 1}, cfg, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parallel_config({"tp": 2, "pp": 1, "cp": 1}, ModelConfig(), 2).tensor_model_parallel_size == 2
    assert (
        parallel_config({"tp": 1, "pp": 1, "cp": 1, "backend": "gloo"}, ModelConfig(), 2).resolved_backend() == "gloo"
    )


def test_auto_backend_with_a_gpu_but_no_nccl_is_refused_before_any_process_group(monkeypatch):
    """parallel.backend=auto took nccl whenever a CUDA GPU was visible, also in a torch built without NCCL (its
    Windows CUDA builds): the process group's start failed with torch's traceback instead of one line."""
    import torch
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        parallel_config({"tp": 1, "pp": 1, "cp": 1}, ModelConfig(), 2)
    assert str(e.value).startswith("parallel.backend=auto takes nccl for the visible CUDA GPU, but this torch is")
    assert "CUDA_VISIBLE_DEVICES=" in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert parallel_config({"tp": 1, "pp": 1, "cp": 1}, ModelConfig(), 2).resolved_backend() == "nccl"


def test_a_model_that_is_not_llama_shaped_is_refused_naming_its_keys():
    """ModelConfig builds LayerNorm, GELU, learned positions and biases, but a run's checkpoints are exported and
    evaluated as Llama models: the keys that differ are named before anything starts (it used to stop after the
    model was built, naming only the model)."""
    from shiq_train.cli import check_llama_shaped

    check_llama_shaped(ModelConfig())
    with pytest.raises(ConfigError) as e:
        check_llama_shaped(ModelConfig(normalization="LayerNorm", add_bias_linear=True))
    assert str(e.value).startswith("model.normalization='LayerNorm', model.add_bias_linear=True: model 'tiny' is not")
    assert "use gated_linear_unit=True, activation='silu', normalization='RMSNorm'" in str(e.value)


def test_an_online_reference_from_a_random_start_drawn_by_an_earlier_release_is_not_resumed():
    """With init=none the online reference is rebuilt from the seeded random start on resume. It is the same in
    every layout and device now (draw_random_start), so they may change; a checkpoint that does not record how
    its start was drawn came from a release that drew it per pipeline stage: another reference, refused."""
    from shiq_train.cli import check_online_reference_start
    from shiq_train.model import RANDOM_START

    cfg = {"init": "none", "train": {"reference": "online"}, "parallel": {"tp": 1, "pp": 2, "vpp": 1}}
    for meta in ({}, {"random_start": "megatron"}, None):
        with pytest.raises(ConfigError, match="saved by an earlier shiq-train, which drew the random start"):
            check_online_reference_start(cfg, {"layout": {"tp": 1, "pp": 1, "dp": 1}, "meta": meta})
    check_online_reference_start(cfg, {"layout": {"tp": 2, "pp": 1, "dp": 1}, "meta": {"random_start": RANDOM_START}})
    for other in ({"init": "smollm2"}, {"train": {"reference": "precomputed"}}):  # a loaded or stored reference
        check_online_reference_start({**cfg, **other}, {"layout": {"tp": 2, "pp": 1, "dp": 1}, "meta": {}})


def test_a_random_start_is_the_same_model_in_every_layout(tmp_path):
    """init=none: megatron-core draws the weights per pipeline stage, so PP=2 trained another model than one
    process (other losses from step 1). draw_random_start draws each weight by its full name: PP=2 x VPP=2 gives
    the single process's losses and gradient norms, and its checkpoint continues in one process, whose online
    reference (rebuilt from the random start) is then the same: the uninterrupted run's losses."""
    write_tiny_buffer(tmp_path / "buf", with_ref=False)
    common = [
        f"data.buffer={tmp_path / 'buf'}",
        "train.reference=online",
        "model.num_layers=4",
        "data.rows_per_micro_batch=2",
        "data.micro_batches_per_step=2",
        "optimizer.lr=3e-3",
        "seed=3",
    ]
    one = shiq_train(*common, f"out={tmp_path / 'one'}", "train.steps=4")
    assert one.returncode == 0, one.stderr[-3000:]
    run = tmp_path / "pp"
    pp = shiq_train(*common, f"out={run}", "train.steps=2", "parallel.pp=2", "parallel.vpp=2", nproc=2)
    assert pp.returncode == 0, pp.stderr[-3000:]
    assert _layout(run, 2) == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}
    _close(metrics(run), metrics(tmp_path / "one")[:2], "loss")
    _close(metrics(run), metrics(tmp_path / "one")[:2], "grad_norm")
    resumed = shiq_train(*common, f"out={run}", "train.steps=4")
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, resumed.stderr[-3000:]
    _close(metrics(run), metrics(tmp_path / "one"), "loss")
    _close(metrics(run), metrics(tmp_path / "one"), "grad_norm")


def test_the_random_start_draws_each_weight_as_megatron_core_does():
    """draw_random_start uses megatron-core's initialiser of each kind of weight: per weight, the spread of its
    values matches megatron-core's own draw (the output projections' scaled by 1/sqrt(2 x layers), the others
    init_method_std), norm weights stay ones; the same seed draws the same weights, another seed others."""
    import torch

    from shiq_train import model as M
    from shiq_train import parallel

    cfg = ModelConfig(vocab_size=256, max_sequence_length=16, num_layers=8, hidden_size=64, num_attention_heads=4)
    with parallel.distributed(seed=0):
        model = M.build_model(cfg)
        theirs = {n: p.detach().clone() for n, p in model.named_parameters()}
        M.draw_random_start(model, seed=7)
        ours = {n: p.detach().clone() for n, p in model.named_parameters()}
        M.draw_random_start(model, seed=7)
        again = {n: p.detach().clone() for n, p in model.named_parameters()}
        M.draw_random_start(model, seed=8)
        other = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaled = [n for n in ours if n.endswith(("linear_proj.weight", "linear_fc2.weight"))]
    assert len(scaled) == 16 and theirs[scaled[0]].std() < 0.3 * cfg.init_method_std  # the kinds differ
    for n, p in ours.items():
        assert torch.equal(p, again[n]), n
        if p.dim() < 2:
            assert torch.equal(p, theirs[n]), n  # ones and zeros, as megatron-core set them
            continue
        assert not torch.equal(p, theirs[n]) and not torch.equal(p, other[n]), n
        assert abs(p.mean().item()) < 0.1 * theirs[n].std().item(), n
        assert p.std().item() == pytest.approx(theirs[n].std().item(), rel=0.08), n


def test_vpp_is_in_the_train_config_and_may_change_on_resume(tmp_path):
    import yaml

    from shiq_train.cli import RESUME_SAFE_KEYS, check_resume_config

    assert yaml.safe_load((REPO / "configs" / "train.yaml").read_text())["parallel"]["vpp"] == 1
    assert "parallel.vpp" in RESUME_SAFE_KEYS
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"parallel": {"tp": 1, "pp": 1}}))  # before vpp existed
    new = {"parallel": {"tp": 1, "pp": 2, "vpp": 2}}
    assert check_resume_config(tmp_path, new, set(), False, (1, 1)) == ["parallel.pp", "parallel.vpp"]


def test_collectives_wait_parallel_timeout_minutes(monkeypatch):
    """The process groups waited 300 s at most, fixed: at 70B, data-parallel rank 0 writes and hashes a
    checkpoint of some 100 GB while the others wait at a barrier, and the run stopped. parallel.timeout_minutes
    (30 by default) sets it."""
    import torch.distributed as dist

    from shiq_train import parallel

    seen = {}
    init = dist.init_process_group

    def recording(*a, **kw):
        seen["timeout"] = kw["timeout"]
        return init(*a, **kw)

    monkeypatch.setattr(dist, "init_process_group", recording)
    for config, minutes in ((parallel.ParallelConfig(), 30), (parallel.ParallelConfig(timeout_minutes=90), 90)):
        with parallel.distributed(config, seed=0):
            assert seen["timeout"].total_seconds() == 60 * minutes


@pytest.mark.parametrize(
    "option, missing",
    [
        ("parallel.backend=nccl", "needs a CUDA GPU and NCCL, but no CUDA GPU is visible"),
        ("model.transformer_impl=transformer_engine", "needs a CUDA GPU and Transformer Engine (GPU available: False"),
        ("model.fp8=hybrid", "needs a CUDA GPU with FP8 support"),
        ("parallel.cp=2", ": context parallelism needs a CUDA GPU and Transformer Engine"),
    ],
)
def test_gpu_only_options_are_refused_on_the_cpu_in_one_line(tmp_path, option, missing):
    """On this machine (no GPU, no Transformer Engine) each GPU-only option chosen on the command line stops
    ``shiq-train`` with status 2 and one line naming the option and what is missing, no traceback, no run folder."""
    import torch
    from test_train_cli import run_cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    res = run_cli(tmp_path, f"out={tmp_path / 'run'}", "train.steps=1", "train.reference=online", option)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    name = option.split("=")[0]
    assert lines[0].startswith(f"shiq-train: error: {name}") and missing in lines[0], lines
    assert not (tmp_path / "run").exists()
