"""Interleaved (virtual) pipeline stages through the Trainer: PP=2 × 2 virtual stages train like one process,
and their checkpoints resume in one process (and one process's at PP=2 × VPP=2).

A tiny GPT of 4 layers (hidden 64, 4 heads, vocabulary 128, float32, no dropout; rank 0 holds layers 0 and 2,
rank 1 layers 1 and 3) trains with the ShiQ loss on the 24-row buffer of ``tests/test_checkpoint_layouts.py``
(AdamW with weight decay, warm-up and cosine decay, clipping; 2 micro-batches of 2 rows a step). The reference
is one uninterrupted single-process run of 6 steps with a checkpoint at step 3. From the same initial
parameters, 2 gloo processes at PP=2 × VPP=2 run 3 steps with the default optimizer and 3 with megatron's DDP
and distributed optimizer (``optimizer.distributed``), and continue the reference's step-3 checkpoint for 3
steps; the PP=2 × VPP=2 checkpoints of both optimizers then resume in one process for 3 more. Asserted: every step's loss and
gradient norm equal the reference's within the parity tests' relative 1e-5; the resumed process's final
parameters equal the reference's; the full parameters exported from the interleaved checkpoint and those an
evaluation hook gathers from the chunks (global layer names from chunk-local ones) equal those of the
reference's step 3.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from ranks import spawn
from test_checkpoint_layouts import ROWS_PER_MICRO_BATCH, SEED, TOL, _rel, make_buffer, tiny_config

from shiq_data.buffer import open_buffer
from shiq_data.sampler import BufferSampler
from shiq_train import model as M
from shiq_train import parallel
from shiq_train.checkpoint import gather_full_parameters, load_checkpoint
from shiq_train.export import full_parameters_from_checkpoint
from shiq_train.objectives import LossConfig
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer

LAYERS, MICRO_BATCHES = 4, 2  # 2 micro-batches a step: a multiple of pp, as the interleaved schedule needs
CLIP = 3.0  # the gradient norm clipped at: some steps are, others not
# Parameters after AdamW steps, against the one-process run's (largest difference / largest weight). AdamW divides
# each element's update by its own gradient scale, so the two runs' rounding differences (another order of
# summation across the pipeline) grow where gradients are small: 1.5e-4 was seen on one 2-core machine, below
# 1e-4 on another. A layer or chunk put in the wrong place differs by order 1.
PARAM_TOL = 1e-3
VPP = parallel.ParallelConfig(1, 2, virtual_pipeline_model_parallel_size=2)


def train(out_dir, buffer_dir, steps: int, init=None, save_every=0, distributed=False, evaluate=None):
    """Train (or resume from ``out_dir``) until ``steps`` in the current layout: the model is this rank's
    chunks under virtual stages (``evaluate``: the hook, after the last step); returns ``[loss, grad_norm]`` of
    each step run."""
    chunks = M.build_model_chunks(tiny_config(num_layers=LAYERS))
    model = chunks if len(chunks) > 1 else chunks[0]
    if init is not None:
        M.load_full_parameters(model, init)
    trainer = Trainer(
        model,
        LossConfig("shiq", beta=0.1),
        OptimizerConfig(
            lr=2e-3,
            min_lr=2e-4,
            weight_decay=0.1,
            clip_grad=CLIP,
            warmup_steps=2,
            decay_steps=4,
            distributed=distributed,
        ),
        TrainConfig(steps=steps, save_every=save_every, progress=False, tensorboard=False, eval_every=steps),
        out_dir,
    )
    data = BufferSampler(
        open_buffer(buffer_dir),
        rows_per_micro_batch=ROWS_PER_MICRO_BATCH,
        micro_batches_per_step=MICRO_BATCHES,
        seed=SEED,
    )
    return [[h["loss"], h["grad_norm"]] for h in trainer.fit(data, evaluate=evaluate)]


def _worker(rank, port, d):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    with parallel.distributed(VPP, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        init = torch.load(d / "init.pt", weights_only=True)

        def evaluate(step, model):  # an evaluation hook gets the chunks: the whole model, gathered on rank 0
            full = gather_full_parameters(model)
            if full is not None:
                torch.save(full, d / f"evaluated_{step}.pt")

        out = {
            "vpp": train(d / "vpp", d / "buffer", 3, init, evaluate=evaluate),
            "distributed": train(d / "vpp_distributed", d / "buffer", 3, init, distributed=True),
            "into": train(d / "into_vpp", d / "buffer", 6),  # the reference's step 3, continued at PP2×VPP2
        }
    if rank == 0:
        (d / "vpp.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("interleaved")
    make_buffer(d / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config(num_layers=LAYERS))
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(init, d / "init.pt")
        ref = train(d / "reference", d / "buffer", 6, init, save_every=3)
        ref_final = gather_full_parameters(_loaded(d / "reference" / "checkpoints"))
    shutil.copytree(d / "reference", d / "into_vpp")  # resumable at the reference's step 3
    shutil.rmtree(d / "into_vpp" / "checkpoints" / "step_00000006")
    (d / "into_vpp" / "checkpoints" / "latest").write_text("step_00000003\n")
    spawn(_worker, args=(parallel.free_port(), str(d)), nprocs=2)
    return {"dir": d, "ref": ref, "ref_final": ref_final, **json.loads((d / "vpp.json").read_text())}


def _loaded(ckpt_dir):
    model = M.build_model(tiny_config(num_layers=LAYERS))
    load_checkpoint(ckpt_dir, model)
    return model


def _check(got, want):
    """Losses and gradient norms of each step, within the parity tolerance."""
    assert len(got) == len(want)
    for k, what in enumerate(("loss", "grad_norm")):
        a, b = [g[k] for g in got], [w[k] for w in want]
        assert _rel(a, b) < TOL, (what, a, b)


def test_pp2_vpp2_trains_like_one_process_with_either_optimizer(runs):
    assert len(runs["ref"]) == 6
    assert max(n for _, n in runs["ref"]) > CLIP > min(n for _, n in runs["ref"])  # clipping on some steps only
    _check(runs["vpp"], runs["ref"][:3])
    _check(runs["distributed"], runs["ref"][:3])
    saved = runs["dir"] / "vpp" / "checkpoints" / "step_00000003"
    assert json.loads((saved / "meta.json").read_text())["layout"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_tp0_pp0_dp0.pt", "rank_tp0_pp1_dp0.pt"]


def test_a_one_process_checkpoint_continues_at_pp2_vpp2(runs):
    _check(runs["into"], runs["ref"][3:])


def test_a_pp2_vpp2_checkpoint_resumes_in_one_process(runs):
    d = runs["dir"]
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):  # another seed: nothing may come from this run's initialisation
        more = train(d / "vpp", d / "buffer", 6)
        final = gather_full_parameters(_loaded(d / "vpp" / "checkpoints"))
    _check(runs["vpp"] + more, runs["ref"])
    assert sorted(final) == sorted(runs["ref_final"])
    for k in final:  # PARAM_TOL: AdamW's per-element normalisation amplifies the runs' float rounding
        assert _rel(final[k], runs["ref_final"][k]) < PARAM_TOL, (k, _rel(final[k], runs["ref_final"][k]))


def test_a_distributed_optimizer_pp2_vpp2_checkpoint_resumes_in_one_process(runs):
    """The sharded optimizer state of megatron's distributed optimizer, saved by the chunks of two pipeline
    ranks, continues in one process with the default optimizer: steps 4-6 are the reference's."""
    d = runs["dir"]
    saved = d / "vpp_distributed" / "checkpoints" / "step_00000003"
    assert json.loads((saved / "meta.json").read_text())["layout"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        more = train(d / "vpp_distributed", d / "buffer", 6)
    _check(runs["distributed"] + more, runs["ref"])


def test_the_interleaved_checkpoint_and_evaluation_hook_see_global_layer_names(runs):
    """Exported from the PP2×VPP2 checkpoint's rank files, and gathered by an evaluation hook from the chunks,
    the step-3 model is the one-process run's step-3 model."""
    d = runs["dir"]
    want = full_parameters_from_checkpoint(d / "reference" / "checkpoints" / "step_00000003", LAYERS)
    exported = full_parameters_from_checkpoint(d / "vpp" / "checkpoints" / "step_00000003", LAYERS)
    evaluated = torch.load(d / "evaluated_3.pt", weights_only=True)
    for got in (exported, evaluated):
        assert sorted(got) == sorted(want)
        assert {k.split(".")[2] for k in got if ".layers." in k} == {"0", "1", "2", "3"}
        for k in got:
            assert _rel(got[k], want[k]) < PARAM_TOL, (k, _rel(got[k], want[k]))
