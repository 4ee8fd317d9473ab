"""Training through megatron's DistributedDataParallel and distributed optimizer (``optimizer.distributed``)
matches the single-process AdamW run, shards the optimizer state, and resumes exactly.

The tiny GPT, micro-batches and ShiQ loss of ``test_parallel_parity`` (float32), AdamW with weight decay
(1-D parameters exempt), one warm-up step, cosine decay and a clipping threshold that clips some steps and
not others. Reference: the default optimizer (per-parameter all-reduce, whole AdamW state) in one process.
DP=1, DP=2, DP=2×PP=2 and DP=2×TP=2 (the last two slow) with the distributed optimizer run the same 4
optimizer steps (each data-parallel rank on its share of the micro-batches). Asserted: every step's loss,
gradient norm and learning rate, and every parameter after the last step, equal the reference to a relative
difference below ``TOL`` (the parity tests' 1e-5; under TP=2 the parameters are compared with the default
optimizer in the same layout, see that test); the AdamW state per rank at DP=2 is half of DP=1's (padding
aside); a run of 2 steps through the Trainer, saved and resumed (a new model and optimizer) for 2 more, ends
where 4 uninterrupted steps end, bit for bit. bfloat16 parameters: float32 masters, measured state size.
"""

import os
import sys
import warnings

import pytest
import torch
from ranks import spawn
from test_parallel_parity import SEED, TOL, _gather, _rel, make_micro_batches, shiq_actions_loss_fn, tiny_config

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.dist_optim import build_distributed, optimizer_state_bytes
from shiq_train.objectives import LossConfig
from shiq_train.train_step import OptimizerConfig, build_optimizer, train_step
from shiq_train.trainer import TrainConfig, Trainer

STEPS = 4
OPT = OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.1, clip_grad=2.5, warmup_steps=1, decay_steps=3)


def run_steps(model, opt, sched, dp_rank=0, dp=1, steps=STEPS):
    """``steps`` optimizer steps on the parity micro-batches (this rank's share); per-step loss and norm."""
    out = []
    for _ in range(steps):
        m = train_step(model, opt, sched, make_micro_batches()[dp_rank::dp], shiq_actions_loss_fn, OPT.clip_grad)
        out.append((m["loss"], m["grad_norm"], m["lr"]))
    return out


def local_params(model):
    """This rank's parameters in ``_gather``'s format (full name, TP layout, tensor)."""
    out = {}
    for name, p in M.unwrap(model).named_parameters():
        dim, glu = M.tp_layout(model, name, p)
        out[name] = (M.full_param_name(model, name), dim, glu, p.detach().clone())
    return out


class Slice:
    """The parity micro-batches, this data-parallel rank's share, as a Trainer data source."""

    def __init__(self, dp_rank, dp):
        self.dp_rank, self.dp, self.pos = dp_rank, dp, 0

    def next_micro_batches(self):
        self.pos += 1
        return make_micro_batches()[self.dp_rank :: self.dp]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def fit(full, out_dir, steps):
    """Trainer with the distributed optimizer from ``full`` parameters; resumes from ``out_dir`` if saved."""
    from megatron.core import parallel_state as ps

    model = M.build_model(tiny_config())
    M.load_full_parameters(model, full)
    loss_cfg = LossConfig(name="shiq", beta=0.1)
    # the mean of micro-batch means, as run_steps computes it (the step's mean over its terms, the Trainer's
    # default, through this optimizer: tests/test_loss_average.py)
    cfg = TrainConfig(steps=steps, tensorboard=False, progress=False, loss_average="micro_batch")
    trainer = Trainer(model, loss_cfg, OptimizerConfig(**{**OPT.__dict__, "distributed": True}), cfg, out_dir)
    history = trainer.fit(Slice(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()))
    return [h["loss"] for h in history], local_params(trainer.model)


def _worker(rank, world, port, tp, pp, params_path, out_dir, resume, plain):
    import shiq_train.dist_optim as D

    D.GATHER_CHUNK = 1007  # the saved and resumed state travels in many pieces, across parameter boundaries
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with parallel.distributed(
        parallel.ParallelConfig(tp, pp), rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=SEED
    ):
        from megatron.core import parallel_state as ps

        full = torch.load(params_path, weights_only=True)
        model = M.build_model(tiny_config())
        M.load_full_parameters(model, full)
        ddp, opt, sched = build_distributed(model, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        res = {"steps": run_steps(ddp, opt, sched, dp_rank, dp), "params": local_params(ddp)}
        res.update(tp_rank=ps.get_tensor_model_parallel_rank(), state_bytes=optimizer_state_bytes(opt))
        if plain:  # the default optimizer in the same layout
            model = M.build_model(tiny_config())
            M.load_full_parameters(model, full)
            popt, psched = build_optimizer(model, OPT)
            res["plain"] = {"steps": run_steps(model, popt, psched, dp_rank, dp), "params": local_params(model)}
        if resume:  # the Trainer: 2 steps and a checkpoint, then a new model and optimizer resuming for 2 more
            ckpt = os.path.join(out_dir, "run")
            fit(full, ckpt, 2)
            res["resumed"] = fit(full, ckpt, STEPS)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default optimizer in one process, and the distributed one at DP=1, from the same parameters."""
    d = tmp_path_factory.mktemp("distopt")
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt, sched = build_optimizer(model, OPT)
        steps = run_steps(model, opt, sched)
        ref = {"steps": steps, "params": local_params(model), "plain_bytes": optimizer_state_bytes(opt)}
        model1 = M.build_model(tiny_config())
        M.load_full_parameters(model1, full)
        ddp, dopt, dsched = build_distributed(model1, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        ref["dp1"] = {"steps": run_steps(ddp, dopt, dsched), "params": local_params(ddp)}
        ref["dp1_bytes"] = optimizer_state_bytes(dopt)
    path = d / "full_params.pt"
    torch.save(full, path)
    ref["params_path"] = str(path)
    ref["full"] = {k: v for _, (k, _, _, v) in ref["params"].items()}
    return ref


def _spawn(reference, out_dir, tp, dp, pp=1, resume=False, plain=False):
    world = tp * pp * dp
    spawn(
        _worker,
        args=(world, parallel.free_port(), tp, pp, reference["params_path"], str(out_dir), resume, plain),
        nprocs=world,
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def dp2(reference, tmp_path_factory):
    return _spawn(reference, tmp_path_factory.mktemp("dp2"), tp=1, dp=2, resume=True)


def _assert_matches(reference, results, tp, params_like=None):
    """Losses, norms and learning rates of every step equal the single-process run's; the parameters after
    the last step equal ``params_like`` (default: the single-process run's)."""
    ref_steps = reference["steps"]
    assert len(ref_steps) == STEPS and results
    assert any(n > OPT.clip_grad for _, n, _ in ref_steps) and any(n < OPT.clip_grad for _, n, _ in ref_steps)
    for res in results:  # every step of each rank (zip alone stopped at a rank's fewer steps)
        assert len(res["steps"]) == STEPS, f"{len(res['steps'])} steps, not {STEPS}"
        for step, ((loss, norm, lr), (rloss, rnorm, rlr)) in enumerate(zip(res["steps"], ref_steps, strict=True)):
            assert _rel(torch.tensor(loss), torch.tensor(rloss)) < TOL, f"step {step + 1}: loss {loss} vs {rloss}"
            assert _rel(torch.tensor(norm), torch.tensor(rnorm)) < TOL, f"step {step + 1}: norm {norm} vs {rnorm}"
            assert lr == rlr == OPT.lr_at(step)
    params = _gather([{"grads": r["params"], "tp_rank": r["tp_rank"]} for r in results], tp)
    want = reference["full"] if params_like is None else params_like
    initial = torch.load(reference["params_path"], weights_only=True)
    assert sorted(params) == sorted(want) == sorted(initial)
    for k, v in params.items():
        assert _rel(v, want[k]) < TOL, f"{k}: relative difference {_rel(v, want[k]):.2e}"
        assert _rel(initial[k], want[k]) > 100 * TOL, f"{k} did not train"


def test_distributed_optimizer_at_dp1_matches_the_default_optimizer(reference):
    _assert_matches(reference, [{**reference["dp1"], "tp_rank": 0}], tp=1)


def test_dp2_matches_the_single_process_run_step_for_step(reference, dp2):
    _assert_matches(reference, dp2, tp=1)


def test_optimizer_state_per_rank_halves_at_dp2(reference, dp2):
    # float32 parameters: AdamW's two moments are the whole state (no master copies), one step count each
    full = sum(v.numel() for v in reference["full"].values()) * 4 * 2
    assert full <= reference["plain_bytes"] < full * 1.01
    assert full <= reference["dp1_bytes"] < full * 1.01
    for res in dp2:
        assert 0.49 < res["state_bytes"] / reference["dp1_bytes"] < 0.51


def test_resumed_trainer_run_equals_the_uninterrupted_run(dp2):
    for res in dp2:  # uninterrupted: the 4 steps each rank ran first, from the same parameters and data
        losses, params = res["resumed"]
        assert losses == [loss for loss, _, _ in res["steps"][2:]]
        assert params.keys() == res["params"].keys()
        for name, (_, _, _, p) in params.items():
            assert torch.equal(p, res["params"][name][3]), name


@pytest.mark.slow  # 4 processes; the quick variant is the DP=2 test above
def test_dp2_pp2_matches_the_single_process_run_step_for_step(reference, tmp_path):
    """Pipeline stages with the tied embedding: megatron's finalize_model_grads sums its two copies' gradients."""
    _assert_matches(reference, _spawn(reference, tmp_path, tp=1, dp=2, pp=2), tp=1)


@pytest.mark.slow  # 4 processes; the quick variant is the DP=2 test above
def test_dp2_tp2_matches_the_single_process_run_step_for_step(reference, tmp_path):
    """Under tensor parallelism the gradients differ from one process's by float rounding (below 1e-6, see
    test_parallel_parity), which AdamW's m / sqrt(v) carries at full step size for elements whose gradient is
    near 0: after 4 steps the parameters of the default optimizer at TP=2×DP=2 differ from one process's by up
    to ~3e-4 (relative to the largest). So the parameters are compared with the default optimizer in the same
    layout (the losses and norms with one process)."""
    results = _spawn(reference, tmp_path, tp=2, dp=2, plain=True)
    plain = _gather([{"grads": r["plain"]["params"], "tp_rank": r["tp_rank"]} for r in results], 2)
    _assert_matches(reference, results, tp=2, params_like=plain)


def test_bfloat16_parameters_get_float32_masters_and_train_like_the_default():
    """bfloat16 weights (the norm weights stay float32): the distributed optimizer keeps float32 masters of
    the bfloat16 parameters only and accumulates gradients in float32, where the default optimizer
    (``MasterWeightOptimizer``) accumulates them in bfloat16; so the losses agree to bfloat16 precision."""
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config(params_dtype="bfloat16"))
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt, sched = build_optimizer(model, OPT)
        plain = run_steps(model, opt, sched)
        model_plain = model
        model = M.build_model(tiny_config(params_dtype="bfloat16"))
        M.load_full_parameters(model, full)
        ddp, dopt, dsched = build_distributed(model, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        ours = run_steps(ddp, dopt, dsched)
        assert "type" not in vars(torch.Tensor) and "cuda" not in vars(torch.Tensor)  # restored after each call
        n16 = sum(p.numel() for p in full.values() if p.dtype == torch.bfloat16)
        n32 = sum(p.numel() for p in full.values() if p.dtype == torch.float32)
        assert n16 > 0 and n32 > 0
        # two float32 moments per element, a float32 master per bfloat16 element, a step count per tensor
        assert optimizer_state_bytes(dopt) == 8 * (n16 + n32) + 4 * n16 + 4 * len(full)
        assert optimizer_state_bytes(opt) == 8 * (n16 + n32) + 4 * (n16 + n32) + 4 * len(full)
        saved = dopt.state_dict()  # full per-parameter float32 tensors of each parameter's shape
        assert sorted(saved["state"]) == sorted(full)
        assert all(saved["state"][k]["param"].shape == full[k].shape for k in full)
        # a checkpoint keeps the float32 masters of the bfloat16 parameters; a float32 one is its own master
        sliced = dopt.state_by_name(ddp)["params"]
        for k, v in full.items():
            if v.dtype == torch.float32:
                assert sliced[k]["master"] is None, k
            else:
                assert torch.equal(sliced[k]["master"], saved["state"][k]["param"].view(-1)), k
        with pytest.raises(ValueError, match="not written by optimizer.distributed=true"):
            dopt.load_state_dict(opt.state_dict())
        name = sorted(full)[0]
        with pytest.raises(ValueError, match=rf"missing \['{name}'\]"):
            dopt.load_state_dict({**saved, "state": {k: v for k, v in saved["state"].items() if k != name}})
        # the default optimizer's checkpoint form converts: its float32 master weights, moments and step become
        # the distributed optimizer's state
        from shiq_train.checkpoint import optimizer_state_by_name

        by_name = optimizer_state_by_name(model_plain, opt)
        fresh = M.build_model(tiny_config(params_dtype="bfloat16"))
        M.load_full_parameters(fresh, {k: v.detach() for k, v in model_plain.named_parameters()})
        _, dopt2, _ = build_distributed(fresh, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        dopt2.load_state_by_name(fresh, by_name)
        got = dopt2.state_dict()
        master_of = {id(p): m for p, m in zip(opt.params, opt.masters)}  # every parameter's float32 copy
        for n, p in model_plain.named_parameters():
            m = master_of[id(p)]
            assert torch.equal(got["state"][n]["param"], m.detach()), n
            assert torch.equal(got["state"][n]["exp_avg"], opt.inner.state[m]["exp_avg"]), n
            assert torch.equal(got["state"][n]["exp_avg_sq"], opt.inner.state[m]["exp_avg_sq"]), n
        assert {g["step"] for g in got["groups"]} == {STEPS}
    for step, ((loss, norm, _), (ploss, pnorm, _)) in enumerate(zip(ours, plain)):
        assert abs(loss - ploss) < 1e-2 * abs(ploss), f"step {step + 1}: {loss} vs {ploss}"
        assert abs(norm - pnorm) < 2e-2 * abs(pnorm), f"step {step + 1}: {norm} vs {pnorm}"
    assert ours[-1][0] < ours[0][0] - 0.1  # it trains


def test_only_the_default_optimizers_adamw_state_converts():
    """The default optimizer's by-name state converts into the distributed optimizer's only when it is that
    AdamW's, with both moments and one step count for every parameter: another optimizer's groups, a missing
    moment, a parameter in the other weight-decay group or step counts that differ (a parameter some steps
    skipped) are refused in one line, where they loaded as zeros or the largest count."""
    import copy

    from shiq_train.checkpoint import optimizer_state_by_name

    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        opt, sched = build_optimizer(model, OPT)
        run_steps(model, opt, sched, steps=2)
        good = optimizer_state_by_name(model, opt)
        fresh = M.build_model(tiny_config())
        _, dopt, _ = build_distributed(fresh, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        names = sorted(good["params"])
        matrix = next(n for n in names if good["params"][n]["state"]["exp_avg"].dim() > 1)
        cases = []
        sgd = copy.deepcopy(good)
        sgd["groups"] = [{"lr": 0.1, "momentum": 0.9}] * 2
        cases.append((sgd, "is not the default optimizer's AdamW"))
        no_moment = copy.deepcopy(good)
        del no_moment["params"][matrix]["state"]["exp_avg_sq"]
        cases.append((no_moment, f"parameter {matrix} has no exp_avg_sq"))
        regrouped = copy.deepcopy(good)
        regrouped["params"][matrix]["group"] = 1
        cases.append((regrouped, f"puts parameter {matrix} in group 1"))
        skipped = copy.deepcopy(good)
        skipped["params"][matrix]["state"]["step"] = torch.tensor(1.0)
        cases.append((skipped, "step counts differ between parameters \\(1, 2\\)"))
        for state, message in cases:
            with pytest.raises(ValueError, match=message) as e:
                dopt.load_state_by_name(fresh, state)
            assert "optimizer.distributed=false" in str(e.value) and "\n" not in str(e.value)
        dopt.load_state_by_name(fresh, good)  # (the same optimizer takes the state it was refused beside)
        assert {g["step"] for g in dopt.state_dict()["groups"]} == {2}


def test_the_state_travels_in_pieces_a_device_can_hold(monkeypatch):
    """state_dict gathered three float32 vectors of the whole model on every data-parallel rank's device (90 GiB
    at 8B), load_state_dict broadcast them so: now each rank's device holds one piece of GATHER_CHUNK values at a
    time. The state in pieces of 5 values (across every parameter's boundary) is the state in one piece, and
    loads back into another optimizer as it was, with no device tensor of the optimizer state larger than 5."""
    import shiq_train.dist_optim as D

    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        ddp, opt, sched = build_distributed(model, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        run_steps(ddp, opt, sched, steps=2)
        whole = opt.state_dict()
        sizes = []
        empty = torch.empty

        def recording_empty(*shape, **kw):  # what state_dict and load_state_dict allocate on the device
            t = empty(*shape, **kw)
            if kw.get("device") is not None and sys._getframe(1).f_globals["__name__"] == D.__name__:
                sizes.append(t.numel())
            return t

        monkeypatch.setattr(D, "GATHER_CHUNK", 5)
        monkeypatch.setattr(D.torch, "empty", recording_empty)
        pieces = opt.state_dict()
        assert sorted(pieces["state"]) == sorted(whole["state"]) == sorted(full)
        for name, states in whole["state"].items():
            for k, v in states.items():
                assert torch.equal(pieces["state"][name][k], v), (name, k)
        model2 = M.build_model(tiny_config())
        M.load_full_parameters(model2, full)
        _, opt2, _ = build_distributed(model2, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        opt2.load_state_dict(pieces)
        monkeypatch.setattr(D.torch, "empty", empty)
        assert sizes and max(sizes) <= 5, sizes
        again = opt2.state_dict()
        for name, states in whole["state"].items():
            for k, v in states.items():
                assert torch.equal(again["state"][name][k], v), (name, k)


def test_a_checkpoint_holds_each_ranks_own_slices_and_loads_them_back_in_place():
    """What a checkpoint saves of the distributed optimizer (``state_by_name``) is this rank's slices, no
    gather: at DP=1 one slice per parameter, covering it, equal to the gathered ``state_dict``; they load into
    another optimizer of the same layout as they were. A slice of another range (a layout with other buffers)
    is not this rank's, and is refused in one line."""
    import copy

    from shiq_train.dist_optim import merge_slices

    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        ddp, opt, sched = build_distributed(model, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        run_steps(ddp, opt, sched, steps=2)
        whole = opt.state_dict()["state"]
        saved = opt.state_by_name(ddp)
        assert sorted(saved["params"]) == sorted(full)
        for name, e in saved["params"].items():
            n = full[name].numel()
            assert e["slice"] == [0, n] and e["shape"] == list(full[name].shape), name
            assert e["state"]["exp_avg"].shape == (n,) and float(e["state"]["step"]) == 2
            assert e["master"] is None  # a float32 parameter is its own master: saved as the parameter
            merged = merge_slices(name, [e], "test")
            assert merged["master"] is None and torch.equal(
                whole[name]["param"], dict(M.unwrap(ddp).named_parameters())[name].detach()
            ), name
            assert torch.equal(merged["state"]["exp_avg"], whole[name]["exp_avg"]), name
            assert torch.equal(merged["state"]["exp_avg_sq"], whole[name]["exp_avg_sq"]), name
        model2 = M.build_model(tiny_config())  # the weights as a checkpoint loads them, before the optimizer
        M.load_full_parameters(model2, {n: p.detach().clone() for n, p in M.unwrap(ddp).named_parameters()})
        ddp2, opt2, _ = build_distributed(model2, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
        assert opt2.holds_slices(saved)
        opt2.load_state_by_name(ddp2, saved)
        again = opt2.state_dict()
        assert {g["step"] for g in again["groups"]} == {2}
        for name, states in whole.items():
            for k, v in states.items():
                assert torch.equal(again["state"][name][k], v), (name, k)
        name = sorted(full)[0]
        shifted = copy.deepcopy(saved)
        shifted["params"][name]["slice"] = [1, full[name].numel() + 1]
        assert not opt2.holds_slices(shifted)
        with pytest.raises(ValueError, match="optimizer slices are not this layout's") as e:
            opt2.load_state_by_name(ddp2, shifted)
        assert "\n" not in str(e.value)
        # two slices that overlap (or leave a gap) do not make a parameter
        half = full[name].numel() // 2
        a, b = copy.deepcopy(saved["params"][name]), copy.deepcopy(saved["params"][name])
        a["slice"], b["slice"] = [0, half + 1], [half, full[name].numel()]
        for e in (a, b):
            lo, hi = e["slice"]
            e["state"] = {
                **e["state"],
                "exp_avg": e["state"]["exp_avg"][lo:hi],
                "exp_avg_sq": e["state"]["exp_avg_sq"][lo:hi],
            }
        with pytest.raises(
            ValueError, match=rf"where: the distributed optimizer's slices of {name} do not cover it once"
        ):
            merge_slices(name, [a, b], "where")


def test_the_option_is_validated_and_refused_where_it_does_not_apply():
    from shiq_train.qsharp_train import value_config_from_run

    with pytest.raises(ValueError, match="optimizer.distributed must be true or false"):
        OptimizerConfig(distributed="yes")
    with pytest.raises(ValueError, match="optimizer.fp32_master_weights must be true or false"):
        OptimizerConfig(fp32_master_weights="false")  # a non-empty string read as true
    with pytest.raises(ValueError, match="set optimizer.fp32_master_weights=true"):
        OptimizerConfig(distributed=True, fp32_master_weights=False)
    run = {"loss": {"name": "qsharp_value"}, "optimizer": {"distributed": True}, "train": {}, "data": {}, "seed": 0}
    with pytest.raises(ValueError, match="loss=qsharp_value trains in one process"):
        value_config_from_run(run)


def test_the_step_count_is_read_where_each_adam_keeps_it():
    """torch's Adam counts per parameter (a tensor in each state entry); Transformer Engine's and Apex's fused
    Adam, which megatron-core takes on a GPU machine that has either, count per parameter group and keep no
    per-parameter ``step`` (their checkpoints would otherwise fail on the first save). After a resume torch's
    groups also carry the saved count, which its Adam never advances: the per-parameter counts win."""
    from shiq_train.dist_optim import adam_step

    p = torch.nn.Parameter(torch.ones(3))
    torch_adam = torch.optim.AdamW([p])
    assert adam_step(torch_adam.state_dict()) == 0
    for _ in range(3):
        p.grad = torch.ones(3)
        torch_adam.step()
    assert adam_step(torch_adam.state_dict()) == 3
    resumed = torch_adam.state_dict()
    resumed["param_groups"][0]["step"] = 1  # megatron's load hands the saved groups, "step" included, to torch
    assert adam_step(resumed) == 3
    fused_like = {"state": {0: {"exp_avg": p, "exp_avg_sq": p}}, "param_groups": [{"params": [0], "step": 5}]}
    fused_like["param_groups"].append({"params": [], "step": 0})  # an empty group is never stepped
    assert adam_step(fused_like) == 5
    with pytest.raises(RuntimeError, match=r"step counts differ between parameters: \[2, 5\]"):
        adam_step({"state": {}, "param_groups": [{"params": [0], "step": 5}, {"params": [1], "step": 2}]})
