"""A checkpoint resumes under another tensor/pipeline/data-parallel layout, optimizer state included.

The issue's test: a tiny GPT (2 layers, hidden 64, 4 heads, vocabulary 128, float32, no dropout) trains with
the Trainer on a 24-row replay buffer (ShiQ loss on the buffer's reference statistics; AdamW with weight
decay, warm-up and cosine decay, so moments, step and schedule all matter), global batches of 2
micro-batches of 2 rows. The reference is one uninterrupted single-process run of 6 steps. The same initial
parameters train 3 steps at TP2×PP2 (4 gloo processes) and save; that checkpoint resumes for 3 more steps
at TP1×PP1 (1 process) and at DP2 (2 processes, one micro-batch each: the same global batches); and the
reference's own step-3 checkpoint resumes at TP2×PP2; a TP2 checkpoint (2 processes; with and without sequence
parallelism) resumes at PP2, and both
its checkpoints read offline (as export reads them) are the reference's parameters. Asserted:
all 6 losses equal the reference's within a relative 1e-5 (as in ``tests/test_parallel_parity.py``), and
the resumed single process's final parameters equal the reference's. Also: a checkpoint of another model
shape is refused in one line, in the saved layout and in another one.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from checkpoint_files import write_meta
from ranks import spawn

from shiq_data.buffer import open_buffer, write_buffer
from shiq_data.sampler import BufferSampler
from shiq_train import model as M
from shiq_train import parallel
from shiq_train.checkpoint import gather_full_parameters, load_checkpoint
from shiq_train.objectives import LossConfig
from shiq_train.train_step import OptimizerConfig, build_optimizer
from shiq_train.trainer import TrainConfig, Trainer

SEED, VOCAB, SEQ, ROWS = 1234, 128, 16, 24
GLOBAL_MICRO_BATCHES, ROWS_PER_MICRO_BATCH = 2, 2
TOL = 1e-5


def tiny_config(**kw) -> M.ModelConfig:
    shape = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, **kw}
    return M.ModelConfig(vocab_size=VOCAB, max_sequence_length=SEQ, **shape)


def make_buffer(path: Path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(ROWS):
        prompt, n = int(rng.integers(2, 5)), int(rng.integers(8, SEQ + 1))
        mask = [False] * prompt + [True] * (n - prompt)
        rows.append(
            {
                "row_id": f"r{i}",
                "source": "t",
                "group_id": i // 2,
                "prompt_len": prompt,
                "tokens": rng.integers(0, VOCAB, n).tolist(),
                "action_mask": mask,
                "rewards": [0.0] * (n - 1) + [float(np.float32(rng.normal()))],
                "ref_chosen_logits": [0.0] + [float(np.float32(x)) for x in rng.normal(0, 0.1, n - 1)],
                "ref_logz": [0.0] + [float(np.float32(np.log(VOCAB) + x)) for x in rng.normal(0, 0.1, n - 1)],
            }
        )
    tok = {"name": "toy", "fingerprint": "f" * 64, "vocab_size": VOCAB}
    write_buffer(rows, path, tokenizer_info=tok, command=["t"], shard_rows=10, progress=False, ref_model={"n": 1})


def train(
    out_dir, buffer_dir, steps: int, init=None, save_every=0, distributed=False, last=-1, sp=False
) -> list[float]:
    """Train (or resume, if ``out_dir`` holds a checkpoint) until ``steps`` in the current layout, from the
    full parameters ``init`` (with megatron's distributed optimizer if ``distributed``; only the ``last`` layers
    trained, all with -1; with sequence parallelism if ``sp``); returns the losses of the steps run (every rank)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    model = M.build_model(tiny_config(sequence_parallel=sp))
    if init is not None:
        M.load_full_parameters(model, init)
    trainer = Trainer(
        model,
        LossConfig("shiq", beta=0.1),
        OptimizerConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup_steps=2, decay_steps=4, distributed=distributed),
        TrainConfig(steps=steps, save_every=save_every, progress=False, tensorboard=False, trainable_last_layers=last),
        out_dir,
    )
    data = BufferSampler(
        open_buffer(buffer_dir),
        rows_per_micro_batch=ROWS_PER_MICRO_BATCH,
        micro_batches_per_step=GLOBAL_MICRO_BATCHES // dp,  # the same global batches in every layout
        seed=SEED,
        dp_rank=ps.get_data_parallel_rank(),
        dp_world=dp,
        width_multiple=M.width_multiple(tiny_config(sequence_parallel=sp), ps.get_tensor_model_parallel_world_size()),
    )
    return [h["loss"] for h in trainer.fit(data)]


def _worker(rank, ports, d):
    """TP2×PP2 on 4 processes: 3 steps from the reference's initial parameters, saved, and the reference's
    one-process checkpoint of step 3 continued for 3 steps; then processes 0 and 1 resume a copy of the
    TP2×PP2 checkpoint at DP2 (a new process group) for 3 more steps."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    url = "tcp://127.0.0.1:{}".format
    with parallel.distributed(
        parallel.ParallelConfig(2, 2), rank=rank, world_size=4, init_method=url(ports[0]), seed=99
    ):
        losses = train(d / "tp2pp2", d / "buffer", 3, torch.load(d / "init.pt", weights_only=True))
        into = train(d / "into_tp2pp2", d / "buffer", 6)  # the reference's step 3, continued at TP2×PP2
    if rank == 0:
        (d / "tp2pp2.json").write_text(json.dumps(losses))
        (d / "into_tp2pp2.json").write_text(json.dumps(into))
        shutil.copytree(d / "tp2pp2", d / "dp2")  # before joining the DP2 group, which waits for rank 0
    if rank < 2:
        with parallel.distributed(rank=rank, world_size=2, init_method=url(ports[1]), seed=99):
            losses = train(d / "dp2", d / "buffer", 6)
        if rank == 0:
            (d / "dp2.json").write_text(json.dumps(losses))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The buffer, the initial parameters (``init.pt``) and the uninterrupted 6-step single-process reference,
    saved at steps 3 and 6."""
    d = tmp_path_factory.mktemp("layouts")
    make_buffer(d / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(init, d / "init.pt")
        ref_losses = train(d / "reference", d / "buffer", 6, init, save_every=3)
        ref_final = gather_full_parameters(_loaded(d / "reference" / "checkpoints"))  # the reference's last model
    return {"dir": d, "ref_losses": ref_losses, "ref_final": ref_final}


@pytest.fixture(scope="module")
def runs(reference):
    """The reference, a TP2×PP2 checkpoint of step 3 (same initial parameters) and its DP2 continuation
    (steps 4-6)."""
    d, ref_losses, ref_final = reference["dir"], reference["ref_losses"], reference["ref_final"]
    shutil.copytree(d / "reference", d / "into_tp2pp2")  # resumable at the reference's step 3
    shutil.rmtree(d / "into_tp2pp2" / "checkpoints" / "step_00000006")
    (d / "into_tp2pp2" / "checkpoints" / "latest").write_text("step_00000003\n")
    spawn(_worker, args=((parallel.free_port(), parallel.free_port()), str(d)), nprocs=4)
    first, into, dp2 = (json.loads((d / f"{n}.json").read_text()) for n in ("tp2pp2", "into_tp2pp2", "dp2"))
    return {"dir": d, "ref_losses": ref_losses, "ref_final": ref_final, "first": first, "into": into, "dp2": dp2}


def _loaded(ckpt_dir, cfg=None):
    model = M.build_model(cfg or tiny_config())
    load_checkpoint(ckpt_dir, model)
    return model


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _resumable_copy(runs, name) -> Path:
    out = runs["dir"] / name
    shutil.copytree(runs["dir"] / "tp2pp2", out)
    return out


def test_tp2xpp2_trains_like_one_process(runs):
    assert len(runs["first"]) == 3 and len(runs["ref_losses"]) == 6
    assert _rel(runs["first"], runs["ref_losses"][:3]) < TOL, (runs["first"], runs["ref_losses"][:3])
    saved = runs["dir"] / "tp2pp2" / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == sorted(
        f"rank_tp{t}_pp{p}_dp0.pt" for p in range(2) for t in range(2)
    )


def test_tp2xpp2_checkpoint_resumes_in_one_process(runs):
    out = _resumable_copy(runs, "tp1")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):  # another seed: nothing may come from this run's initialisation
        losses = train(out, runs["dir"] / "buffer", 6)
        final = gather_full_parameters(_loaded(out / "checkpoints"))
    assert len(losses) == 3
    got = runs["first"] + losses
    print("reference", runs["ref_losses"], "\nTP2xPP2 then TP1", got)
    assert _rel(got, runs["ref_losses"]) < TOL, (got, runs["ref_losses"])
    assert sorted(final) == sorted(runs["ref_final"])
    # AdamW turns a rounding-level difference in a gradient element near 0 into a step of up to 2·lr in that
    # element (the losses agree to 1e-5): measured 2.6e-5 of the largest weight with the mean of micro-batch
    # means, 1.1e-4 with the step's mean over its terms (train.loss_average=step, whose gradients equal the
    # single process's at TP=2 and PP=2 to 1e-5: tests/test_loss_average.py)
    for k in final:
        assert _rel(final[k], runs["ref_final"][k]) < 3e-4, (k, _rel(final[k], runs["ref_final"][k]))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_tp2xpp2_checkpoint_resumes_at_dp2(runs):
    got = runs["first"] + runs["dp2"]
    print("reference", runs["ref_losses"], "\nTP2xPP2 then DP2", got)
    assert len(runs["dp2"]) == 3 and _rel(got, runs["ref_losses"]) < TOL, (got, runs["ref_losses"])
    out = runs["dir"] / "dp2" / "checkpoints" / "step_00000006"
    assert json.loads((out / "meta.json").read_text())["layout"]["dp"] == 2
    assert sorted(p.name for p in out.glob("rank_*.pt")) == ["rank_tp0_pp0_dp0.pt", "rank_tp0_pp0_dp1.pt"]


def test_one_process_checkpoint_resumes_at_tp2xpp2(runs):
    got = runs["ref_losses"][:3] + runs["into"]
    assert len(runs["into"]) == 3 and _rel(got, runs["ref_losses"]) < TOL, (got, runs["ref_losses"])
    out = runs["dir"] / "into_tp2pp2" / "checkpoints" / "step_00000006"
    assert json.loads((out / "meta.json").read_text())["layout"] == {"tp": 2, "pp": 2, "dp": 1}


def _tp2_then_pp2_worker(rank, ports, d, sp):
    """TP2 on 2 processes (with sequence parallelism if ``sp``): 3 steps from the reference's initial parameters,
    saved; then a copy of that checkpoint resumed at PP2 (a new process group of the same 2 processes) for 3 more
    steps."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    url = "tcp://127.0.0.1:{}".format
    layout = parallel.ParallelConfig(2, 1)
    with parallel.distributed(layout, rank=rank, world_size=2, init_method=url(ports[0]), seed=99):
        first = train(d / f"tp2-sp{sp:d}", d / "buffer", 3, torch.load(d / "init.pt", weights_only=True), sp=sp)
    if rank == 0:
        shutil.copytree(
            d / f"tp2-sp{sp:d}", d / f"tp2-sp{sp:d}_pp2"
        )  # before joining the PP2 group, which waits for rank 0
    layout = parallel.ParallelConfig(1, 2)
    with parallel.distributed(layout, rank=rank, world_size=2, init_method=url(ports[1]), seed=7):
        more = train(d / f"tp2-sp{sp:d}_pp2", d / "buffer", 6)
    if rank == 0:
        (d / f"tp2-sp{sp:d}_pp2.json").write_text(json.dumps(first + more))


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_a_tp2_checkpoint_resumes_at_pp2_and_exports_the_one_process_weights(reference, sp):
    """Tensor-parallel shards saved at TP2 (with sequence parallelism too: micro-batch widths padded to a
    multiple of 2) resume as pipeline stages at PP2 (every parameter whole, the layers split over the ranks, the
    AdamW moments with them): the 6 losses are the uninterrupted one-process run's, and the step-3 (TP2) and
    step-6 (PP2) checkpoints read offline, as ``shiq-train export`` reads them, are the one-process run's
    parameters at those steps."""
    from shiq_train.export import full_parameters_from_checkpoint

    d = reference["dir"]
    spawn(_tp2_then_pp2_worker, args=((parallel.free_port(), parallel.free_port()), str(d), sp), nprocs=2)
    got = json.loads((d / f"tp2-sp{sp:d}_pp2.json").read_text())
    print("reference", reference["ref_losses"], "\nTP2 then PP2", got)
    assert len(got) == 6 and _rel(got, reference["ref_losses"]) < TOL, (got, reference["ref_losses"])
    for step, layout, files in (
        (3, {"tp": 2, "pp": 1, "dp": 1}, ["rank_tp0_pp0_dp0.pt", "rank_tp1_pp0_dp0.pt"]),
        (6, {"tp": 1, "pp": 2, "dp": 1}, ["rank_tp0_pp0_dp0.pt", "rank_tp0_pp1_dp0.pt"]),
    ):
        saved = d / f"tp2-sp{sp:d}_pp2" / "checkpoints" / f"step_{step:08d}"
        assert json.loads((saved / "meta.json").read_text())["layout"] == layout
        assert sorted(p.name for p in saved.glob("rank_*.pt")) == files
        want = full_parameters_from_checkpoint(d / "reference" / "checkpoints" / f"step_{step:08d}", 2)
        exported = full_parameters_from_checkpoint(saved, 2)
        assert sorted(exported) == sorted(want) == sorted(reference["ref_final"])
        for k in want:  # (AdamW's rounding-level steps: see test_tp2xpp2_checkpoint_resumes_in_one_process)
            assert want[k].shape == exported[k].shape and _rel(exported[k], want[k]) < 3e-4, (step, k)
    assert all(torch.equal(want[k], reference["ref_final"][k]) for k in want)  # step 6 read offline


def _distributed_dp2_worker(rank, port, d):
    """Three steps at DP2 with megatron's distributed optimizer (state sharded over the two ranks), saved."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    with parallel.distributed(rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        losses = train(d / "zero1", d / "buffer", 3, torch.load(d / "init.pt", weights_only=True), distributed=True)
    if rank == 0:
        (d / "zero1.json").write_text(json.dumps(losses))


@pytest.fixture(scope="module")
def zero1(runs):
    """The DP2 distributed-optimizer checkpoint of step 3 (the reference's initial parameters and batches) and
    the losses of its 3 steps; tests resume copies of it."""
    d = runs["dir"]
    spawn(_distributed_dp2_worker, args=(parallel.free_port(), str(d)), nprocs=2)
    return {"dir": d / "zero1", "losses": json.loads((d / "zero1.json").read_text())}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_distributed_optimizer_checkpoint_resumes_in_another_layout(runs, zero1, tmp_path):
    """A DP2 checkpoint of the distributed optimizer (each rank's slices of the master weights and moments)
    resumes in one process, the slices put together by parameter, and continues with the reference's losses."""
    run = _copy(zero1["dir"], tmp_path / "zero1")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        more = train(run, runs["dir"] / "buffer", 6, distributed=True)
    got = zero1["losses"] + more
    assert len(zero1["losses"]) == 3 and len(more) == 3
    assert _rel(got, runs["ref_losses"]) < TOL, (got, runs["ref_losses"])


def test_each_value_is_saved_once_by_the_rank_that_holds_it(runs, zero1):
    """At DP2 the parameters are saved once, by data-parallel rank 0, and each rank saves its own slices of the
    distributed optimizer's moments (float32 parameters are their own masters): the two files together hold
    the state once (12 bytes a float32 parameter: weight and two moments; they held 28 when rank 1 saved the
    parameters too and rank 0 the gathered state with a copy of the weights as masters). Put together, the
    slices are the single-process run's AdamW moments at the same step."""
    step = zero1["dir"] / "checkpoints" / "step_00000003"
    files = [torch.load(step / f"rank_tp0_pp0_dp{r}.pt", weights_only=True) for r in range(2)]
    assert files[1]["model"] == {} and files[1]["params"] == {} and files[0]["model"]
    ref = torch.load(
        runs["dir"] / "reference" / "checkpoints" / "step_00000003" / "rank_tp0_pp0_dp0.pt", weights_only=True
    )
    weights = files[0]["model"]
    assert sorted(weights) == sorted(ref["optimizer"]["params"])
    for name, w in weights.items():
        spans = sorted(
            (tuple(f["optimizer"]["params"][name]["slice"]), r)
            for r, f in enumerate(files)
            if name in f["optimizer"]["params"]
        )
        assert spans[0][0][0] == 0 and spans[-1][0][1] == w.numel(), (name, spans)
        assert all(a[0][1] == b[0][0] for a, b in zip(spans, spans[1:])), (name, spans)  # no gap, no overlap

        def joined(pick, spans=spans, name=name, shape=w.shape):
            return torch.cat([pick(files[r]["optimizer"]["params"][name]) for _, r in spans]).view(shape)

        assert all(files[r]["optimizer"]["params"][name]["master"] is None for _, r in spans), name
        for k in ("exp_avg", "exp_avg_sq"):
            want = ref["optimizer"]["params"][name]["state"][k]
            assert _rel(joined(lambda e, k=k: e["state"][k]), want) < TOL, (name, k)
    n = sum(w.numel() for w in weights.values())
    assert any(len(f["optimizer"]["params"]) for f in files[1:])  # rank 1 holds slices too
    size = sum((step / f"rank_tp0_pp0_dp{r}.pt").stat().st_size for r in range(2))
    assert 12 * n <= size < 12 * n * 1.1, (size, 12 * n)


def _as_earlier_release(step: Path) -> None:
    """Rewrite a format-3 DP2 distributed-optimizer step folder as format 2 wrote it: every rank's file holds
    the parameters and layouts, data-parallel rank 0's the whole state per parameter, rank 1's none."""
    from shiq_train.checkpoint import save_hashed
    from shiq_train.dist_optim import STATE_FORMAT

    files = [torch.load(step / f"rank_tp0_pp0_dp{r}.pt", weights_only=True) for r in range(2)]
    params = {}
    for name, w in files[0]["model"].items():
        parts = sorted(
            (f["optimizer"]["params"][name] for f in files if name in f["optimizer"]["params"]),
            key=lambda e: e["slice"][0],
        )
        cat = lambda pick, parts=parts, shape=w.shape: torch.cat([pick(e) for e in parts]).view(shape)  # noqa: E731
        state = {k: cat(lambda e, k=k: e["state"][k]) for k in ("exp_avg", "exp_avg_sq")}
        params[name] = {
            "group": parts[0]["group"],
            "state": {**state, "step": parts[0]["state"]["step"]},
            "master": w.clone(),  # (format 2 saved the float32 masters, copies of the weights)
        }
    groups = [{**g, "format": STATE_FORMAT} for g in files[0]["optimizer"]["groups"]]
    files[0] = {**files[0], "format": 2, "optimizer": {"groups": groups, "params": params}}
    files[1] = {**files[1], "format": 2, "model": files[0]["model"], "params": files[0]["params"], "optimizer": None}
    for r, f in enumerate(files):
        save_hashed(f, step / f"rank_tp0_pp0_dp{r}.pt")


def _dp2_resume_worker(rank, port, d):
    """Resume copies of the DP2 distributed checkpoint at DP2: with the default optimizer (the slices put
    together on every rank), and rewritten as an earlier release saved it (with the distributed optimizer)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    with parallel.distributed(rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        plain = train(d / "to_plain", d / "buffer", 6, distributed=False)
        earlier = train(d / "earlier", d / "buffer", 6, distributed=True)
    if rank == 0:
        (d / "dp2_resumes.json").write_text(json.dumps({"plain": plain, "earlier": earlier}))


def test_distributed_slices_resume_at_dp2_into_either_optimizer_and_earlier_files_still_load(runs, zero1, tmp_path):
    """In the saved layout (DP2) the slices load as they are into the distributed optimizer (the DP2 resume of
    tests/test_distributed_optimizer.py, bit for bit); the default optimizer takes them put together; and a
    checkpoint as an earlier release wrote it (parameters on every rank, the state gathered on rank 0) resumes
    too. Steps 4-6 give the reference's losses each way. A missing rank file is named."""
    _copy(zero1["dir"], tmp_path / "to_plain")
    _as_earlier_release(_copy(zero1["dir"], tmp_path / "earlier") / "checkpoints" / "step_00000003")
    shutil.copytree(runs["dir"] / "buffer", tmp_path / "buffer")
    spawn(_dp2_resume_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    got = json.loads((tmp_path / "dp2_resumes.json").read_text())
    for how in ("plain", "earlier"):
        assert len(got[how]) == 3 and _rel(zero1["losses"] + got[how], runs["ref_losses"]) < TOL, (how, got[how])
    broken = _copy(zero1["dir"], tmp_path / "broken") / "checkpoints" / "step_00000003"
    (broken / "rank_tp0_pp0_dp1.pt").unlink()
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        model = M.build_model(tiny_config())
        opt, sched = build_optimizer(model, OptimizerConfig())
        with pytest.raises(ValueError, match=r"rank_tp0_pp0_dp1.pt is missing: the checkpoint is incomplete"):
            load_checkpoint(broken.parent, model, opt, sched)


def test_a_plain_optimizer_checkpoint_resumes_into_the_distributed_optimizer(runs, tmp_path):
    """The reference's step-3 checkpoint (the default optimizer: AdamW on whole parameters) resumes with
    optimizer.distributed=true: its moments and step become the distributed optimizer's state, the master
    weights the loaded parameters, and steps 4-6 give the reference's losses and final parameters. The
    distributed optimizer refused that state before."""
    shutil.copytree(runs["dir"] / "reference", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000003\n")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        more = train(tmp_path / "run", runs["dir"] / "buffer", 6, distributed=True)
        final = gather_full_parameters(_loaded(tmp_path / "run" / "checkpoints"))
    assert len(more) == 3 and _rel(runs["ref_losses"][:3] + more, runs["ref_losses"]) < TOL, (more, runs["ref_losses"])
    assert sorted(final) == sorted(runs["ref_final"])
    for name, value in final.items():  # (the tolerance of the resumes above: AdamW amplifies rounding near 0)
        assert _rel(value, runs["ref_final"][name]) < 3e-4, (name, _rel(value, runs["ref_final"][name]))


def test_a_checkpoint_of_another_model_shape_is_refused(runs, tmp_path):
    saved = runs["dir"] / "tp2pp2" / "checkpoints"
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        narrow = M.build_model(tiny_config(ffn_hidden_size=128))
        opt, sched = build_optimizer(narrow, OptimizerConfig())
        with pytest.raises(ValueError) as e:  # another layout (TP2×PP2 saved, one process here)
            load_checkpoint(saved, narrow, opt, sched)
        msg = str(e.value)
        assert "\n" not in msg and f"checkpoint {saved / 'step_00000003'} does not fit this model" in msg
        assert "decoder.layers.0.mlp.linear_fc1.weight has shape [512, 64] there, [256, 64] here" in msg
        deeper = M.build_model(tiny_config(num_layers=4))
        with pytest.raises(ValueError, match=r"does not fit this model: parameters only in the checkpoint \[\], "):
            load_checkpoint(saved, deeper)
        # the saved layout: the same message
        from shiq_train.checkpoint import save_checkpoint

        save_checkpoint(tmp_path, 1, M.build_model(tiny_config()))
        with pytest.raises(ValueError, match=r"does not fit this model: .*linear_fc1.weight has shape \[512, 64\] th"):
            load_checkpoint(tmp_path, narrow)


def test_master_weights_moments_and_schedule_go_through_the_by_name_form(tmp_path):
    """bf16 parameters with float32 master weights: a checkpoint loaded through the by-name reassembly (its
    meta.json claims another data-parallel size, so the saved data-parallel rank 0 file is cut for this
    rank) continues exactly like an uninterrupted run: masters, AdamW moments and step, weight-decay groups
    and learning-rate schedule all restored. Without saved optimizer state the masters start from the loaded
    parameters."""
    from shiq_train.checkpoint import save_checkpoint
    from shiq_train.objectives import LossConfig as LC
    from shiq_train.train_step import MasterWeightOptimizer, objective_loss_fn, train_step

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    mask = torch.arange(SEQ).expand(2, SEQ) >= 4
    mb = {
        "tokens": tokens,
        "action_mask": mask,
        "rewards": torch.randn(2, SEQ, generator=g) * mask,
        "ref_chosen_logits": torch.randn(2, SEQ, generator=g) * 0.1,
        "ref_logz": torch.randn(2, SEQ, generator=g) * 0.1 + float(np.log(VOCAB)),
    }
    loss_fn = objective_loss_fn(LC("shiq", beta=0.1))
    opt_cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1, decay_steps=3)
    warnings.filterwarnings("ignore")
    with parallel.distributed():

        def fresh(seed):
            parallel.set_seed(seed)
            model = M.build_model(tiny_config(params_dtype="bfloat16"))
            return (model, *build_optimizer(model, opt_cfg))

        def run(state, n):
            return [train_step(*state, [mb], loss_fn, 1.0)["loss"] for _ in range(n)]

        straight, interrupted = fresh(1), fresh(1)
        assert isinstance(straight[1], MasterWeightOptimizer)
        want = run(straight, 4)
        got = run(interrupted, 2)
        d = save_checkpoint(tmp_path, 2, *interrupted, user_state={"data": {"position": 8}})
        write_meta(d / "meta.json", (d / "meta.json").read_text().replace('"dp": 1', '"dp": 2'))
        for suffix in ("", ".sha256"):  # the file a second data-parallel rank would have written
            shutil.copy(d / f"rank_tp0_pp0_dp0.pt{suffix}", d / f"rank_tp0_pp0_dp1.pt{suffix}")
        resumed = fresh(2)
        assert load_checkpoint(tmp_path, *resumed) == (2, {"data": {"position": 8}})
        got += run(resumed, 2)
        save_checkpoint(tmp_path / "params_only", 4, straight[0])  # no optimizer state saved
        other = fresh(3)
        load_checkpoint(tmp_path / "params_only", *other)
        assert all(torch.equal(m, p.float()) for p, m in zip(other[1].params, other[1].masters))
    assert got == want
    for (n, p), (_, q) in zip(straight[0].named_parameters(), resumed[0].named_parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(straight[1].masters, resumed[1].masters):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def _frozen_stage_worker(rank, port, d):
    """PP2 with the distributed optimizer and only the last layer trained: the first stage (global rank 0) has
    no trainable parameter. Three steps, saved."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    cfg = parallel.ParallelConfig(1, 2)
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        init = torch.load(d / "init.pt", weights_only=True)
        losses = train(d / "frozen_pp2", d / "buffer", 3, init, distributed=True, last=1)
    if rank == 0:
        (d / "frozen_pp2.json").write_text(json.dumps(losses))


def test_a_frozen_first_stage_keeps_the_step_count_of_the_stage_that_trains(runs, tmp_path):
    """The saved groups of global rank 0 (a frozen first stage: no state, step 0) gave the step count of every
    parameter resumed in another layout, so AdamW's bias correction started over: steps 4-6 were 8e-4 away from
    the uninterrupted run's. The step now comes from the stage that holds the state."""
    d = runs["dir"]
    spawn(_frozen_stage_worker, args=(parallel.free_port(), str(d)), nprocs=2)
    first = json.loads((d / "frozen_pp2.json").read_text())
    run = _copy(d / "frozen_pp2", tmp_path / "run")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        init = torch.load(d / "init.pt", weights_only=True)
        reference = train(tmp_path / "reference", d / "buffer", 6, init, distributed=True, last=1)
        more = train(run, d / "buffer", 6, distributed=True, last=1)
    assert len(first) == 3 and len(more) == 3
    assert _rel(first + more, reference) < TOL, (first + more, reference)


def _damaged_worker(rank, port, d, names):
    """Load each damaged copy of the DP2 distributed checkpoint at DP2 (the saved layout): every rank records
    what it raised (a hang would stop the test at the one-minute collective timeout)."""
    from shiq_train.dist_optim import build_distributed

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    cfg = parallel.ParallelConfig(timeout_minutes=1)
    got = {}
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        for name in names:
            ddp, opt, sched = build_distributed(M.build_model(tiny_config()), OptimizerConfig(distributed=True))
            try:
                load_checkpoint(d / name / "checkpoints", ddp, opt, sched)
                got[name] = "loaded"
            except ValueError as e:
                got[name] = str(e)
    (d / f"damaged{rank}.json").write_text(json.dumps(got))


def test_damaged_slices_and_a_rank_file_of_another_step_stop_every_rank(zero1, tmp_path):
    """In the saved layout: slices that do not cover a parameter were named on data-parallel rank 0 while rank 1
    waited in a collective (gloo ended it when rank 0 exited; NCCL would hang), and a rank file of another step
    (copied in) went unnoticed: each rank resumed from its own step and the run desynchronised. Now every rank
    stops with the same ValueError in one line. In another layout (one process) the file of another step is named."""
    from shiq_train.checkpoint import save_hashed

    step = "checkpoints/step_00000003/rank_tp0_pp0_dp1.pt"
    for name in ("slices", "step"):
        path = _copy(zero1["dir"], tmp_path / name) / step
        state = torch.load(path, weights_only=True)
        if name == "slices":  # one slice moved by one element: a gap at its start, an overlap at its end
            entry = next(iter(state["optimizer"]["params"].values()))
            entry["slice"] = [entry["slice"][0] + 1, entry["slice"][1] + 1]
        else:  # as the same rank's file of the step before would read
            state["step"] = 2
        save_hashed(state, path)
    shutil.copytree(zero1["dir"].parent / "buffer", tmp_path / "buffer")
    spawn(_damaged_worker, args=(parallel.free_port(), str(tmp_path), ["slices", "step"]), nprocs=2)
    got = [json.loads((tmp_path / f"damaged{r}.json").read_text()) for r in range(2)]
    assert "do not cover it once" in got[0]["slices"] and got[1]["slices"] == got[0]["slices"], got
    assert f"{tmp_path / 'step' / step}: saved at step 2, not 3" in got[1]["step"], got
    assert got[0]["step"] == got[1]["step"], got  # rank 1's line on every rank
    assert all("\n" not in m for g in got for m in g.values())
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        model = M.build_model(tiny_config())
        opt, sched = build_optimizer(model, OptimizerConfig())
        with pytest.raises(
            ValueError, match=r"rank_tp0_pp0_dp1.pt: saved at step 2, data-parallel rank 0's file at step 3"
        ):
            load_checkpoint(tmp_path / "step" / "checkpoints", model, opt, sched)


def _misfit_worker(rank, port, d):
    """TP2: one step saved, then two copies of it whose tensor-parallel rank 1 file no longer fits the model
    (rank 0's still does), made by rank 0: ``names``, a parameter renamed; ``group``, a parameter's optimizer
    state put in the other parameter group. Each is loaded in the saved layout (``names`` without and with an
    optimizer): every rank records what it raised (a hang would stop the test at the one-minute collective
    timeout)."""
    import torch.distributed as dist

    from shiq_train.checkpoint import save_hashed

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    cfg = parallel.ParallelConfig(tensor_model_parallel_size=2, timeout_minutes=1)
    got = {}
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        train(d / "run", d / "buffer", 1, save_every=1)
        if rank == 0:
            for damage in ("names", "group"):
                one = _copy(d / "run", d / damage) / "checkpoints" / "step_00000001" / "rank_tp1_pp0_dp0.pt"
                state = torch.load(one, weights_only=True)
                if damage == "names":
                    name = sorted(state["model"])[-1]
                    state["model"][name + ".renamed"] = state["model"].pop(name)
                else:
                    entry = state["optimizer"]["params"][sorted(state["optimizer"]["params"])[-1]]
                    entry["group"] = 1 - entry["group"]
                save_hashed(state, one)
        dist.barrier()
        for damage, optimizer in (("names", False), ("names", True), ("group", True)):
            model = M.build_model(tiny_config())
            opt = build_optimizer(model, OptimizerConfig())[0] if optimizer else None
            try:
                load_checkpoint(d / damage / "checkpoints", model, opt)
                got[f"{damage} {optimizer}"] = "loaded"
            except ValueError as e:
                got[f"{damage} {optimizer}"] = str(e)
    (d / f"misfit{rank}.json").write_text(json.dumps(got))


def test_a_rank_whose_own_file_does_not_fit_stops_every_rank(tmp_path):
    """In the saved layout each tensor and pipeline rank checks its own file against its shard of the model, and
    loads its own optimizer state: a file that did not fit (a parameter renamed; a parameter's state in another
    group, found after the parameters' check) stopped that rank alone, the others waiting in the next collective
    (gloo ended it with a transport error when the rank exited, NCCL waits for parallel.timeout_minutes). Now
    every rank stops with the failing rank's line."""
    make_buffer(tmp_path / "buffer")
    spawn(_misfit_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"misfit{r}.json").read_text()) for r in range(2)]
    for key in ("names False", "names True"):
        assert "does not fit this model: parameters only in the checkpoint" in got[1][key], got
        assert ".renamed" in got[1][key] and got[0][key] == got[1][key], got
    assert "in optimizer group" in got[1]["group True"] and got[0]["group True"] == got[1]["group True"], got
    assert all("\n" not in m for g in got for m in g.values())


def _resharded_optimizer_misfit_worker(rank, port, d):
    """PP2: load the one-process checkpoint (its final norm's optimizer state put in the other group) with an
    optimizer; every rank records what it raised."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    cfg = parallel.ParallelConfig(1, 2, timeout_minutes=1)
    got = "no error"
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        model = M.build_model(tiny_config())
        opt = build_optimizer(model, OptimizerConfig())[0]
        try:
            load_checkpoint(d / "run" / "checkpoints", model, opt)
            got = "loaded"
        except ValueError as e:
            got = str(e)
    (d / f"reshardmisfit{rank}.json").write_text(json.dumps(got))


def test_a_stage_whose_resharded_optimizer_state_does_not_fit_stops_every_rank(tmp_path):
    """In another layout each stage loads the optimizer state of its own parameters: one that did not fit (a
    parameter in another group, here the last stage's final norm) stopped that stage alone, the others going on
    into training's first collective. Now every rank stops with the failing rank's line."""
    from shiq_train.checkpoint import save_hashed

    one = _one_process_step(tmp_path)
    state = torch.load(one, weights_only=True)
    state["optimizer"]["params"]["decoder.final_layernorm.weight"]["group"] = 0
    save_hashed(state, one)
    got = _resumed_at_pp2(tmp_path)
    assert "in optimizer group" in got[1] and got[0] == got[1], got


def _one_process_step(tmp_path):
    """The rank file of one step trained in one process (``tmp_path/run``), for a test to edit."""
    make_buffer(tmp_path / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=99):
        train(tmp_path / "run", tmp_path / "buffer", 1, save_every=1)
    return tmp_path / "run" / "checkpoints" / "step_00000001" / "rank_tp0_pp0_dp0.pt"


def _resumed_at_pp2(tmp_path) -> list[str]:
    """What each of two PP2 ranks resuming ``tmp_path/run`` raised (:func:`_resharded_optimizer_misfit_worker`)."""
    spawn(_resharded_optimizer_misfit_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    return [json.loads((tmp_path / f"reshardmisfit{r}.json").read_text()) for r in range(2)]


def test_a_checkpoint_without_parameter_layouts_is_refused_in_another_layout_on_every_rank(tmp_path):
    """A rank file of the first format (no ``params``: the parameters' full names and tensor-parallel layouts)
    cannot be cut for another layout: at PP2, the one-process checkpoint of that format is refused on every rank
    in one line naming the file and the layout it resumes in."""
    from shiq_train.checkpoint import BY_NAME, save_hashed

    one = _one_process_step(tmp_path)
    state = torch.load(one, weights_only=True)
    assert state["format"] in BY_NAME and isinstance(state["params"], dict)
    del state["params"]
    save_hashed({**state, "format": 1}, one)
    got = _resumed_at_pp2(tmp_path)
    want = f"{one}: written without the parameter layouts (an older shiq_train), so it resumes only in its own layout tp=1 pp=1 dp=1"
    assert got == [want, want], got


def _one_rank_fails_worker(rank, port, d):
    """PP2 loads of the one-process checkpoint (steps 1 and 2) where rank 1 alone fails: ``memory``, host memory
    runs out while it loads its optimizer state; ``meta``, it reads another step folder than rank 0 (a folder not
    shared between nodes); ``missing``, it finds no checkpoint. Every rank records what it raised (a hang would
    stop the test at the one-minute collective timeout)."""
    import shiq_train.checkpoint as ck

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    ckpts = d / "run" / "checkpoints"
    cfg = parallel.ParallelConfig(1, 2, timeout_minutes=1)
    got = {}
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        for case in ("memory", "meta", "missing"):
            model = M.build_model(tiny_config())
            opt = build_optimizer(model, OptimizerConfig())[0]
            kwargs, real = {}, ck.load_optimizer_state_by_name
            if case == "memory" and rank == 1:

                def no_room(*a, **k):
                    raise MemoryError("host out of memory")

                ck.load_optimizer_state_by_name = no_room
            if case == "meta":
                kwargs["step_dir"] = ckpts / f"step_0000000{rank + 1}"
            where = d / "empty" if case == "missing" and rank == 1 else ckpts
            try:
                load_checkpoint(where, model, opt, **kwargs)
                got[case] = "loaded"
            except Exception as e:
                got[case] = f"{type(e).__name__}: {e}"
            finally:
                ck.load_optimizer_state_by_name = real
    (d / f"onefails{rank}.json").write_text(json.dumps(got))


def test_a_rank_failing_alone_in_any_way_stops_every_rank(tmp_path):
    """Only a ``ValueError`` was shared: another error on one rank (host memory running out in a copy) left the
    others waiting in their next collective; a rank that found no checkpoint stopped alone; ranks that read
    different ``meta.json`` files (a folder not shared between nodes) took different paths. Now the failing rank
    raises its own error and the others a line naming it; different folders stop every rank with one line."""
    make_buffer(tmp_path / "buffer")
    (tmp_path / "empty").mkdir()
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=99):
        train(tmp_path / "run", tmp_path / "buffer", 2, save_every=1)
    spawn(_one_rank_fails_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"onefails{r}.json").read_text()) for r in range(2)]
    assert got[1]["memory"] == "MemoryError: host out of memory", got
    assert got[0]["memory"] == "ValueError: rank 1 stopped loading the checkpoint: MemoryError: host out of memory"
    assert got[0]["meta"] == got[1]["meta"], got
    assert got[0]["meta"].startswith("ValueError: rank 1 read ") and "step_00000002/meta.json" in got[0]["meta"], got
    assert got[1]["missing"].startswith(f"FileNotFoundError: no checkpoint in {tmp_path / 'empty'}"), got
    assert got[0]["missing"].startswith("ValueError: rank 1 stopped loading the checkpoint: FileNotFoundError"), got
    assert all("\n" not in m for g in got for m in g.values())


def _tokens_worker(rank, port, d):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    cfg = parallel.ParallelConfig(timeout_minutes=1)
    with parallel.distributed(cfg, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        train(Path(d) / "dp2", Path(d) / "buffer", 6)


def test_the_logged_tokens_are_the_rows_real_tokens_over_every_data_parallel_rank(tmp_path):
    """``tokens_per_s`` counted every padded position, and rank 0's count times the number of data-parallel
    ranks; ``tokens`` (new) counts the rows' real tokens over every rank, as ``tokens_per_s`` now does. Six steps of four rows are one epoch of the 24-row buffer: their tokens add up to the
    buffer's (read with pyarrow), and at DP2 (the same global batches) each step's equal DP1's."""
    import pyarrow.compute as pc

    make_buffer(tmp_path / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=99):
        train(tmp_path / "dp1", tmp_path / "buffer", 6)
    spawn(_tokens_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    logged = {
        run: [json.loads(x)["tokens"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("dp1", "dp2")
    }
    total = pc.sum(pc.list_value_length(open_buffer(tmp_path / "buffer").table.column("tokens"))).as_py()
    assert sum(logged["dp1"]) == total and len(logged["dp1"]) == 6, (logged, total)
    assert logged["dp2"] == logged["dp1"], logged


def test_the_files_to_check_are_shared_out_each_once():
    from shiq_train.checkpoint import assign_files

    for sizes, world in (([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2), ([5, 5, 5, 5], 4), ([3, 0, 7], 5), ([4, 4, 4], 1)):
        owner = assign_files(sizes, world)
        assert len(owner) == len(sizes) and all(0 <= r < world for r in owner)
        load = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(world)]
        assert max(load) <= sum(sizes) / world + max(sizes), (sizes, world, load)  # the greedy bound
    assert assign_files([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2).count(0) == 1  # the large file alone on rank 0
    assert assign_files([5, 5, 5, 5], 4) == [0, 1, 2, 3]


def _checks_worker(rank, port, d):
    """Load the DP2 checkpoint at DP2, recording which files this rank hashed; then a copy with rank 1's file
    corrupted: what each rank raised."""
    import shiq_train.checkpoint as C
    from shiq_train.dist_optim import build_distributed

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    hashed, check = [], C.check_sha256

    def recording(path):
        hashed.append(Path(path).name)
        return check(path)

    C.check_sha256 = recording
    got = {}
    with parallel.distributed(rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}", seed=99):
        for name in ("good", "corrupt"):
            ddp, opt, sched = build_distributed(M.build_model(tiny_config()), OptimizerConfig(distributed=True))
            try:
                load_checkpoint(d / name / "checkpoints", ddp, opt, sched)
                got[name] = list(hashed)
            except ValueError as e:
                got[name] = str(e)
    (d / f"checks{rank}.json").write_text(json.dumps(got))


def test_each_rank_file_is_hashed_once_by_one_rank_and_a_bad_one_stops_every_rank(zero1, tmp_path):
    """Every rank hashed each file it read (at DP2, rank 1 its own and rank 0's, the larger): the checkpoint's
    bytes went through the disks once per rank reading them. Now the ranks share the files, each hashed once
    before any is read, and a corrupt file stops every rank with the same line."""
    _copy(zero1["dir"], tmp_path / "good")
    bad = _copy(zero1["dir"], tmp_path / "corrupt") / "checkpoints" / "step_00000003" / "rank_tp0_pp0_dp1.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    spawn(_checks_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"checks{r}.json").read_text()) for r in range(2)]
    ranks = [[f for f in g["good"] if f != "meta.json"] for g in got]  # (each rank checks the small meta.json)
    assert sorted(ranks[0] + ranks[1]) == ["rank_tp0_pp0_dp0.pt", "rank_tp0_pp0_dp1.pt"], got
    assert len(ranks[0]) == len(ranks[1]) == 1
    assert (
        got[0]["corrupt"]
        == got[1]["corrupt"]
        == f"{bad}: sha256 differs from {bad.name}.sha256's (the file changed or is corrupt)"
    )
    # in another layout without an optimizer only the parameters' files are read, and hashed
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=7):
        model = M.build_model(tiny_config())
        assert load_checkpoint(bad.parent.parent, model)[0] == 3  # rank 1's corrupt file is not read
        opt, sched = build_optimizer(model, OptimizerConfig())
        with pytest.raises(ValueError, match="sha256 differs"):
            load_checkpoint(bad.parent.parent, model, opt, sched)


def test_a_load_without_an_optimizer_in_another_layout_reads_no_unchecked_slices(tmp_path):
    """Without an optimizer, a load in another layout checks the data-parallel rank 0 files only: it must not
    read the other ranks' files either (the distributed optimizer's slices, which it does not need). They were
    unpickled unchecked: a symbolic link followed, a truncated or missing file stopped the load."""
    import os

    from shiq_train.checkpoint import is_sliced, read_rank_file

    make_buffer(tmp_path / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        train(tmp_path / "run", tmp_path / "buffer", 1, save_every=1, distributed=True)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert is_sliced(read_rank_file(step / "rank_tp0_pp0_dp0.pt")["optimizer"])
    # the same checkpoint as saved at DP2: its rank 1 file, then damaged in three ways
    write_meta(step / "meta.json", (step / "meta.json").read_text().replace('"dp": 1', '"dp": 2'))
    one = step / "rank_tp0_pp0_dp1.pt"
    for suffix in ("", ".sha256"):
        shutil.copy(step / f"rank_tp0_pp0_dp0.pt{suffix}", step / f"rank_tp0_pp0_dp1.pt{suffix}")
    for damage in ("truncated", "missing", "link"):
        one.unlink(missing_ok=True)
        if damage == "truncated":
            one.write_bytes((step / "rank_tp0_pp0_dp0.pt").read_bytes()[:100])
        elif damage == "link":
            os.symlink(step / "rank_tp0_pp0_dp0.pt", one)
        with parallel.distributed(seed=7):
            model = M.build_model(tiny_config())
            # loaded as another layout (dp 2 there, 1 here): rank 1's file is neither needed nor checked
            assert load_checkpoint(step.parent, model)[0] == 1, damage
            opt, sched = build_optimizer(model, OptimizerConfig())
            with pytest.raises(ValueError, match="rank_tp0_pp0_dp1.pt"):  # with an optimizer it is checked
                load_checkpoint(step.parent, model, opt, sched)


def test_a_rank_file_that_cannot_be_read_stops_the_load_with_one_line(tmp_path):
    """check_rank_files shares every rank's failure (an all-gather of the problems): an OSError (EIO on a
    damaged disk, a folder in a file's place) escaped it on the checking rank only, the others getting a
    transport error instead of the line."""
    from shiq_train.checkpoint import check_rank_files

    make_buffer(tmp_path / "buffer")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        train(tmp_path / "run", tmp_path / "buffer", 1, save_every=1)
        step = tmp_path / "run" / "checkpoints" / "step_00000001"
        sums = step / "rank_tp0_pp0_dp0.pt.sha256"
        sums.unlink()
        sums.mkdir()
        with pytest.raises(ValueError, match=r"rank_tp0_pp0_dp0.pt.sha256: cannot be read to check its sha256"):
            check_rank_files(step, {"tp": 1, "pp": 1, "dp": 1}, every=True)


def _finished_rerun_worker(rank, port, d):
    """Train 2 steps at DP2, cut the log's last line on rank 0 (as a kill while writing it would), then run the
    same 2 steps again: nothing to train, and rank 0 (alone) has a log to repair."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    d = Path(d)
    kw = {"rank": rank, "world_size": 2, "init_method": f"tcp://127.0.0.1:{port}", "seed": 99, "timeout_s": 60}
    with parallel.distributed(**kw):
        first = train(d / "run", d / "buffer", 2)
        if rank == 0:
            metrics = d / "run" / "metrics.jsonl"
            metrics.write_text(metrics.read_text() + '{"step": 3, "lo')
        dist.barrier()
        again = train(d / "run", d / "buffer", 2)
    (d / f"rerun{rank}.json").write_text(json.dumps({"first": first, "again": again}))


def test_a_finished_run_run_again_agrees_on_every_rank_whether_its_log_needs_repair(runs, tmp_path):
    """A run at its last step trains nothing when run again; only rank 0 reads the log, and when its last line
    was cut short it goes on to repair it. The other ranks must go on with it (a rank that returned at once left
    rank 0 waiting for them in the SIGTERM agreement at the end of training): every rank returns no step, and
    the cut line is gone."""
    shutil.copytree(runs["dir"] / "buffer", tmp_path / "buffer")
    spawn(_finished_rerun_worker, args=(parallel.free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rerun{r}.json").read_text()) for r in range(2)]
    assert [len(g["first"]) for g in got] == [2, 2] and [g["again"] for g in got] == [[], []]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
