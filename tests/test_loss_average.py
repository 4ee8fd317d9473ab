"""A step of several micro-batches, and of several data-parallel ranks, minimises the mean over all of the
step's loss terms (``train.loss_average=step``, SHIQ_MATH §3 and §5): action positions for ShiQ and SFT,
turn starts for ShiQ/tk, pairs for DPO, groups with a pair for CoPG, trajectories for DRO-V.

Independent reference: the same rows as one micro-batch in one process, whose loss is that mean by the
definition of each loss. The step's micro-batches hold different numbers of terms (6 rows in 2 prompt
groups of 3, long completions, half of them two turns; 2 rows of one group with short ones; one row alone,
no pair), so the mean of the micro-batches' means (``micro_batch``, megatron's default) differs from it,
which the tests check too (they could not tell the two apart otherwise); packed rows (two trajectories a row)
for the losses that read them. Asserted: the loss and every gradient equal the reference's to a relative
1e-5 in one process (every loss); ShiQ and DPO at DP=2 (micro-batches split over the ranks; the default
optimizer's all-reduce, and megatron's DDP with its distributed optimizer, whose loss and gradient norm are
compared), at PP=2 (micro-batches of different shapes through the 1F1B schedule) and at TP=2; the group losses
CoPG and DRO-V/LOO at DP=2 (each rank holding whole prompt groups), through both optimizers; ``loss_terms``
equals the terms counted here from the rows; one micro-batch on one rank gives the mean's numbers bit for bit;
Q♯'s value trainer weighs micro-batches by their actions.
"""

import os
import warnings

import pytest
import torch
import yaml
from ranks import spawn
from test_parallel_parity import SEED, SEQ, TOL, _gather, _rel, tiny_config

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.dist_optim import build_distributed
from shiq_train.objectives import LossConfig
from shiq_train.train_step import (
    OptimizerConfig,
    build_optimizer,
    finalize_grads,
    forward_backward,
    grad_norm,
    objective_loss_fn,
    train_step,
)
from shiq_train.trainer import TrainConfig, Trainer

VOCAB, BETA = 128, 0.1
LOSSES = ("shiq", "shiq_tk", "sft", "dpo", "copg", "dro_v", "dro_v_loo")
# (completions per group, groups, last action position): a large micro-batch, a small one, and one of a single
# completion (no pair: no DPO or CoPG term)
SHAPES = ((3, 2, 15), (2, 1, 8), (1, 1, 10))
OPT = OptimizerConfig(lr=1e-3, clip_grad=0.0)


def random_rows(g: torch.Generator, action: torch.Tensor, **extra) -> dict:
    """A micro-batch of ``action.shape`` rows: random tokens, rewards on the actions and reference statistics
    (drawn from ``g`` in that order), plus ``extra`` fields."""
    B = action.shape[0]
    return {
        "tokens": torch.randint(0, VOCAB, (B, SEQ), generator=g),
        "action_mask": action,
        "rewards": torch.randn(B, SEQ, generator=g) * action,
        "ref_chosen_logits": torch.randn(B, SEQ, generator=g) * 0.1,
        "ref_logz": torch.log(torch.tensor(float(VOCAB))) + torch.randn(B, SEQ, generator=g) * 0.1,
        **extra,
    }


def micro_batches(count: int = len(SHAPES)) -> list[dict]:
    """The step's micro-batches (the first ``count`` of three): a 4-token prompt, then actions up to a row's last action position
    (odd rows end earlier; the large micro-batch's even rows are two turns, a tool's 2 tokens between them),
    random rewards on the actions and random reference statistics."""
    g = torch.Generator().manual_seed(11)
    out, first_group = [], 0
    for n, (per_group, groups, last) in enumerate(SHAPES[:count]):
        B = per_group * groups
        action = torch.zeros(B, SEQ, dtype=torch.bool)
        for row in range(B):
            action[row, 4 : last + 1 - (row % 2) * 2] = True
            if n == 0 and row % 2 == 0:
                action[row, 9:11] = False
        ids = torch.arange(first_group, first_group + groups).repeat_interleave(per_group)
        out.append(random_rows(g, action, group_ids=ids))
        first_group += groups
    return out


def one_micro_batch(count: int = len(SHAPES)) -> list[dict]:
    """Every row of the step in one micro-batch (group ids stay distinct)."""
    mbs = micro_batches(count)
    return [{k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}]


def counted_terms(name: str, count: int = len(SHAPES)) -> int:
    """The step's loss terms counted from the rows, as each loss of SHIQ_MATH §3 and §5 defines its mean."""
    total = 0
    for mb in micro_batches(count):
        mask, returns, groups = mb["action_mask"], (mb["rewards"] * mb["action_mask"]).sum(1), mb["group_ids"]
        rows = [i for i in range(len(groups)) if bool(mask[i].any())]
        if name in ("shiq", "sft"):
            total += int(mask.sum())
        elif name == "shiq_tk":  # the first action of every turn: an action after a non-action (or at 0)
            total += sum(int(m[t] and (t == 0 or not m[t - 1])) for m in mask.tolist() for t in range(len(m)))
        elif name in ("dro_v", "dro_v_loo"):
            total += len(rows)
        elif name == "dpo":  # ordered pairs of a group with a larger return
            total += sum(int(groups[i] == groups[j] and returns[i] > returns[j]) for i in rows for j in rows)
        elif name == "copg":  # groups with two rows or more
            total += sum(int((groups == gid).sum() >= 2) for gid in groups.unique())
    return total


def packed_micro_batches() -> list[dict]:
    """Two micro-batches of packed rows (3 rows, then 1): each row two trajectories of 8 tokens (segments 0
    and 1; a 3-token prompt, then actions, the second trajectory of odd rows shorter)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for B in (3, 1):
        action = torch.zeros(B, SEQ, dtype=torch.bool)
        for row in range(B):
            action[row, 3:8] = True
            action[row, 11 : SEQ - (row % 2) * 3] = True
        out.append(random_rows(g, action, segment_ids=(torch.arange(SEQ) >= 8).long().expand(B, SEQ).clone()))
    return out


@pytest.mark.parametrize("name", ["shiq", "sft", "dro_v"])
def test_a_step_of_packed_micro_batches_is_the_mean_over_all_its_terms(params, name):
    """Packed rows (several trajectories a row): DRO-V's terms are trajectories, not rows."""
    mbs = packed_micro_batches()
    whole = [{k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}]
    with parallel.distributed(seed=SEED):
        ref_loss, ref_metrics, ref_grads = run(params, whole, name, per_term=False)
        loss, metrics, grads = run(params, packed_micro_batches(), name, per_term=True)
        legacy, _, _ = run(params, packed_micro_batches(), name, per_term=False)
    actions = sum(int(mb["action_mask"].sum()) for mb in mbs)
    assert metrics["loss_terms"] == ref_metrics["loss_terms"] == {"dro_v": 8}.get(name, actions)
    assert _rel(torch.tensor(loss), torch.tensor(ref_loss)) < TOL
    for k, g in ref_grads.items():
        assert _rel(grads[k], g) < TOL, f"{name} {k}: relative difference {_rel(grads[k], g):.2e}"
    assert abs(legacy - ref_loss) > 1e-3 * abs(ref_loss), (name, legacy, ref_loss)


def run(full, mbs, name, per_term, *, dp_rank=0, dp=1):
    """Loss, metrics and reduced gradients of one forward/backward of ``mbs`` from the parameters ``full``."""
    model = M.build_model(tiny_config())
    M.load_full_parameters(model, full)
    model.config.calculate_per_token_loss = per_term
    model.zero_grad(set_to_none=True)
    loss, metrics = forward_backward(
        model, mbs[dp_rank::dp] if dp > 1 else mbs, objective_loss_fn(LossConfig(name, beta=BETA))
    )
    finalize_grads(model)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss, metrics, grads


@pytest.fixture(scope="module")
def params():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=SEED):
        model = M.build_model(tiny_config())
        return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", LOSSES)
def test_a_step_of_several_micro_batches_is_the_mean_over_all_its_terms(params, name):
    # dro_v_loo's value of a one-completion group is the batch's leave-one-out estimate: it depends on which
    # rows share its micro-batch, so that loss is not a mean of per-row terms there; its step has no such group
    n = 2 if name == "dro_v_loo" else len(SHAPES)
    with parallel.distributed(seed=SEED):
        ref_loss, ref_metrics, ref_grads = run(params, one_micro_batch(n), name, per_term=False)
        loss, metrics, grads = run(params, micro_batches(n), name, per_term=True)
        legacy, legacy_metrics, _ = run(params, micro_batches(n), name, per_term=False)
    terms = counted_terms(name, n)
    assert ref_metrics["loss_terms"] == metrics["loss_terms"] == legacy_metrics["loss_terms"] == terms
    assert _rel(torch.tensor(loss), torch.tensor(ref_loss)) < TOL
    for k, g in ref_grads.items():
        assert g.abs().max() > 0, k
        assert _rel(grads[k], g) < TOL, f"{name} {k}: relative difference {_rel(grads[k], g):.2e}"
    # the mean of the micro-batches' means is another number: the test can tell the two apart
    assert abs(legacy - ref_loss) > 1e-3 * abs(ref_loss), (name, legacy, ref_loss)


@pytest.mark.parametrize("name", ["shiq", "dpo"])
def test_one_micro_batch_on_one_rank_is_the_mean_bit_for_bit(params, name):
    with parallel.distributed(seed=SEED):
        a_loss, a_metrics, a_grads = run(params, one_micro_batch(), name, per_term=False)
        b_loss, b_metrics, b_grads = run(params, one_micro_batch(), name, per_term=True)
    assert a_loss == b_loss and a_metrics == b_metrics
    assert all(torch.equal(a_grads[k], b_grads[k]) for k in a_grads)


def test_the_trainer_sets_the_models_loss_average(params, tmp_path):
    with pytest.raises(ValueError, match=r"train.loss_average must be one of \('step', 'micro_batch'\), got 'token'"):
        TrainConfig(loss_average="token")
    with parallel.distributed(seed=SEED):
        for average, flag in (("step", True), ("micro_batch", False)):
            model = M.build_model(tiny_config())
            model.config.calculate_per_token_loss = not flag
            cfg = TrainConfig(steps=1, tensorboard=False, progress=False, loss_average=average)
            Trainer(model, LossConfig("shiq", beta=BETA), OPT, cfg, tmp_path / average)
            assert model.config.calculate_per_token_loss is flag


def test_a_run_started_before_the_option_resumes_only_as_it_ran(tmp_path):
    """A run whose config.yaml has no ``train.loss_average`` averaged micro-batch means: resuming it with the
    new default is a change of that key, named; with ``micro_batch`` it is none."""
    from shiq_train.cli import ConfigError, check_resume_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"out": str(tmp_path), "train": {"steps": 5}}))
    new = {"out": str(tmp_path), "train": {"steps": 5, "loss_average": "step"}}
    with pytest.raises(ConfigError, match=r"train.loss_average 'micro_batch' -> 'step'"):
        check_resume_config(tmp_path, new, set(), False)
    new["train"]["loss_average"] = "micro_batch"
    assert check_resume_config(tmp_path, new, set(), False) == []


# ------------------------------------------------------------------------------------------------
# data and pipeline parallelism (spawned gloo processes)


# metrics of the whole step, whatever its split into micro-batches and ranks: means over its trajectories or
# loss terms, the largest |delta|, DPO's count of pairs (means of the micro-batches' means before)
STEP_WIDE = ("reward", "log_ratio", "abs_delta_mean", "abs_delta_max", "pairs")


PAIRED = (("shiq", len(SHAPES)), ("dpo", len(SHAPES)))


def _worker(rank, world, port, tp, pp, params_path, out_dir, losses=PAIRED):
    """One rank: each ``(name, count)`` of ``losses`` over the first ``count`` micro-batches, this rank's share."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    with parallel.distributed(
        parallel.ParallelConfig(tp, pp), rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}", seed=SEED
    ):
        from megatron.core import parallel_state as ps

        full = torch.load(params_path, weights_only=True)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        res = {}
        for name, count in losses:
            loss, metrics, grads = run(full, micro_batches(count), name, per_term=True, dp_rank=dp_rank, dp=dp)
            model = M.build_model(tiny_config())
            res[name] = {"loss": loss, "terms": metrics["loss_terms"], "grads": _layout(model, grads)}
            res[name]["per_row"] = {k: metrics[k] for k in STEP_WIDE if k in metrics}
            # megatron's DDP and distributed optimizer: one AdamW step, its loss and gradient norm
            M.load_full_parameters(model, full)
            model.config.calculate_per_token_loss = True  # before DDP: it then sums over ranks
            ddp, opt, sched = build_distributed(model, OptimizerConfig(**{**OPT.__dict__, "distributed": True}))
            mbs = micro_batches(count)
            m = train_step(ddp, opt, sched, mbs[dp_rank::dp] if dp > 1 else mbs, _loss(name), OPT.clip_grad)
            res[name]["ddp"] = (m["loss"], m["grad_norm"], m["loss_terms"])
        res["tp_rank"] = ps.get_tensor_model_parallel_rank()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def _loss(name):
    return objective_loss_fn(LossConfig(name, beta=BETA))


def _layout(model, grads):
    return {n: (M.full_param_name(model, n), *M.tp_layout(model, n, p), grads[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 2), (1, 2, 1), (2, 1, 1)], ids=["dp2", "pp2", "tp2"])
def test_parallel_steps_are_the_mean_over_all_terms(params, tmp_path, tp, pp, dp):
    path = tmp_path / "params.pt"
    torch.save(params, path)
    with parallel.distributed(seed=SEED):
        ref = {}
        for name in ("shiq", "dpo"):
            loss, _, grads = run(params, one_micro_batch(), name, per_term=False)
            model = M.build_model(tiny_config())
            M.load_full_parameters(model, params)
            opt, sched = build_optimizer(model, OPT)
            step = train_step(model, opt, sched, one_micro_batch(), _loss(name), OPT.clip_grad)
            per_row = {k: step[k] for k in STEP_WIDE if k in step}
            assert len(per_row) == {"shiq": 4, "dpo": 3}[name]
            norm = grad_norm(model)  # after the step: the same gradients (no clipping)
            assert norm == pytest.approx(step["grad_norm"], rel=1e-12)
            ref[name] = {"loss": loss, "grads": grads, "norm": step["grad_norm"], "per_row": per_row}
    world = tp * pp * dp
    spawn(_worker, args=(world, parallel.free_port(), tp, pp, str(path), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name in ("shiq", "dpo"):
        for res in results:
            r = res[name]
            assert r["terms"] == counted_terms(name)
            assert _rel(torch.tensor(r["loss"]), torch.tensor(ref[name]["loss"])) < TOL, name
            ddp_loss, ddp_norm, ddp_terms = r["ddp"]
            assert ddp_terms == counted_terms(name)
            assert _rel(torch.tensor(ddp_loss), torch.tensor(ref[name]["loss"])) < TOL, name
            assert _rel(torch.tensor(ddp_norm), torch.tensor(ref[name]["norm"])) < TOL, (name, ddp_norm)
            for k, v in ref[name]["per_row"].items():  # over the step's rows, as the loss is over its terms
                assert r["per_row"][k] == pytest.approx(v, rel=TOL, abs=1e-9), (name, k)
        grads = _gather([{"grads": res[name]["grads"], "tp_rank": res["tp_rank"]} for res in results], tp)
        assert sorted(grads) == sorted(ref[name]["grads"])
        for k, g in ref[name]["grads"].items():
            assert _rel(grads[k], g) < TOL, f"{name} {k}: relative difference {_rel(grads[k], g):.2e}"


def test_the_value_models_step_is_the_mean_over_all_its_actions():
    """Q♯'s value trainer (SHIQ_MATH §8) weighs each micro-batch's mean cross-entropy by its share of the
    step's actions: the sum is the loss of all the rows as one batch, which the plain mean of the two
    micro-batches' losses is not."""
    from shiq_train.qsharp_train import action_weights
    from shiq_train.qsharp_value import atom_support, distributional_value_loss

    g = torch.Generator().manual_seed(3)
    atoms = atom_support(-2.0, 2.0, 7)
    mbs = micro_batches()
    for mb in mbs:
        mb["atom_logits"] = torch.randn(*mb["tokens"].shape, 7, generator=g, dtype=torch.float64)
        mb["returns"] = torch.randn(mb["tokens"].shape, generator=g, dtype=torch.float64)
    loss = [distributional_value_loss(mb["atom_logits"], mb["returns"], mb["action_mask"], atoms) for mb in mbs]
    whole = distributional_value_loss(
        *(torch.cat([mb[k] for mb in mbs]) for k in ("atom_logits", "returns", "action_mask")), atoms
    )
    weights = action_weights(mbs)
    assert weights == [n / 75 for n in (60, 8, 7)] == [int(mb["action_mask"].sum()) / 75 for mb in mbs]
    assert float(sum(w * x for w, x in zip(weights, loss, strict=True))) == pytest.approx(float(whole), rel=1e-12)
    assert abs(float(sum(loss)) / 3 - float(whole)) > 1e-3 * float(whole)
    assert action_weights(mbs[:1]) == [1.0]
    empty = [{**mb, "action_mask": torch.zeros_like(mb["action_mask"])} for mb in mbs]
    assert action_weights(empty) == [1 / 3] * 3


def test_the_value_trainer_refuses_the_mean_of_micro_batch_means():
    import pathlib

    from omegaconf import OmegaConf

    from shiq_train.qsharp_train import value_config_from_run

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    cfg = OmegaConf.to_container(OmegaConf.load(root / "train.yaml"))
    cfg.update(loss={"name": "qsharp_value"}, seed=0)
    cfg["data"]["seed"] = 0
    assert value_config_from_run(cfg, 64).micro_batches_per_step == 2
    cfg["train"]["loss_average"] = "micro_batch"
    with pytest.raises(ValueError, match=r"train.loss_average=micro_batch: loss=qsharp_value averages"):
        value_config_from_run(cfg, 64)


@pytest.mark.parametrize("name,count", [("copg", len(SHAPES)), ("dro_v_loo", 2)])
def test_group_losses_at_dp2_are_the_mean_over_all_terms(params, tmp_path, name, count):
    """CoPG's and the leave-one-out DRO-V's terms are prompt groups and their trajectories (SHIQ_MATH §5): at
    DP=2, each rank holding whole groups, the step's loss, gradients and ``loss_terms`` are those of every row as
    one micro-batch in one process, through the default optimizer's all-reduce and megatron's distributed
    optimizer. (DRO-V/LOO on 2 micro-batches: a group of one takes its value from its micro-batch's rows, see
    above.)"""
    path = tmp_path / "params.pt"
    torch.save(params, path)
    with parallel.distributed(seed=SEED):
        loss, _, grads = run(params, one_micro_batch(count), name, per_term=False)
        model = M.build_model(tiny_config())
        M.load_full_parameters(model, params)
        opt, sched = build_optimizer(model, OPT)
        norm = train_step(model, opt, sched, one_micro_batch(count), _loss(name), OPT.clip_grad)["grad_norm"]
        legacy, _, _ = run(params, micro_batches(count), name, per_term=False)  # the two averages differ here
    assert abs(legacy - loss) > 1e-3 * abs(loss), (name, legacy, loss)
    args = (2, parallel.free_port(), 1, 1, str(path), str(tmp_path), ((name, count),))
    spawn(_worker, args=args, nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[name]
        assert r["terms"] == r["ddp"][2] == counted_terms(name, count) > 0
        assert _rel(torch.tensor(r["loss"]), torch.tensor(loss)) < TOL, (rank, r["loss"], loss)
        assert _rel(torch.tensor(r["ddp"][0]), torch.tensor(loss)) < TOL, (rank, r["ddp"][0], loss)
        assert _rel(torch.tensor(r["ddp"][1]), torch.tensor(norm)) < TOL, (rank, r["ddp"][1], norm)
        for k, g in grads.items():
            assert _rel(r["grads"][k][3], g) < TOL, f"{name} {k}: relative difference {_rel(r['grads'][k][3], g):.2e}"
