"""The training loop on a tiny megatron model: learning, exact resume, online reference, freezing."""

import json
import re
import shutil
import warnings

import pytest
import torch

from shiq_train import model as M
from shiq_train import parallel
from shiq_train.objectives import LossConfig
from shiq_train.train_step import OptimizerConfig
from shiq_train.trainer import TrainConfig, Trainer, freeze_all_but_last_layers, frozen_copy

VOCAB, SEQ, PROMPT = 128, 12, 4
GOOD, BAD = 7, 9  # completions ending in GOOD get reward +1, in BAD reward -1


class Synthetic:
    """Seeded micro-batches; each completion repeats one token, rewarded by which token it is."""

    def __init__(self, seed=0, rows=4, micro_batches=2):
        self.seed, self.rows, self.micro_batches, self.pos = seed, rows, micro_batches, 0

    def batch(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        tokens = torch.randint(0, VOCAB, (self.rows, SEQ), generator=g)
        which = torch.tensor([GOOD, BAD])[torch.randint(0, 2, (self.rows,), generator=g)]
        tokens[:, PROMPT:] = which[:, None]
        mask = torch.zeros(self.rows, SEQ, dtype=torch.bool)
        mask[:, PROMPT:] = True
        rewards = torch.zeros(self.rows, SEQ)
        rewards[:, -1] = torch.where(which == GOOD, 1.0, -1.0)
        return {"tokens": tokens, "action_mask": mask, "rewards": rewards, "group_ids": torch.arange(self.rows) // 2}

    def next_micro_batches(self):
        out = [self.batch(self.pos + k) for k in range(self.micro_batches)]
        self.pos += self.micro_batches
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def with_reference(source, ref_model):
    """Wrap a source so batches carry precomputed reference statistics (as a buffer's columns would)."""
    nxt = source.next_micro_batches

    def next_micro_batches():
        mbs = nxt()
        with torch.no_grad():
            for mb in mbs:
                st = M.forward_stats(ref_model, mb["tokens"])
                mb["ref_chosen_logits"], mb["ref_logz"] = st.chosen_logits, st.logz
        return mbs

    source.next_micro_batches = next_micro_batches
    return source


@pytest.fixture
def dist1():
    warnings.filterwarnings("ignore")
    with parallel.distributed(seed=5):
        yield


def cfg():
    return M.ModelConfig(vocab_size=VOCAB, max_sequence_length=SEQ)


def mean_logprob(model, token):
    tokens = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(99))
    tokens[:, PROMPT:] = token
    with torch.no_grad():
        st = M.forward_stats(model, tokens)
    return float((st.chosen_logits - st.logz)[:, PROMPT:].sum(1).mean())  # completion log-probability


def test_short_shiq_run_learns_the_rewarded_tokens(dist1, tmp_path):
    model = M.build_model(cfg())
    ref = frozen_copy(model, cfg())
    before = mean_logprob(model, GOOD), mean_logprob(model, BAD)
    trainer = Trainer(
        model,
        LossConfig("shiq", beta=0.25),
        OptimizerConfig(lr=3e-3),
        TrainConfig(steps=25, progress=False),
        tmp_path,
        ref_model=ref,
    )
    hist = trainer.fit(with_reference(Synthetic(), ref))
    after = mean_logprob(model, GOOD), mean_logprob(model, BAD)
    # optimum: log π*(y)/π_ref(y) = R(y)/β − log Z = ±4 − log Z for the two completions
    print("completion log-prob change", after[0] - before[0], after[1] - before[1])
    assert after[0] > before[0] + 1.0  # the rewarded completion became more likely
    assert after[1] < before[1] - 1.0  # the penalised one less likely
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 26))
    assert {"loss", "reward", "log_ratio", "abs_delta_mean", "abs_delta_max", "grad_norm", "lr", "tokens_per_s"} <= set(
        lines[0]
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_diverged_step_is_logged_and_ends_the_run_before_it_is_saved(dist1, tmp_path):
    """A NaN loss makes the parameters NaN: the run stops at that step in one line, its line in metrics.jsonl
    (even off the log_every grid), and no checkpoint of it (the next step failed naming chosen_logits)."""
    model = M.build_model(cfg())
    trainer = Trainer(
        model,
        LossConfig("shiq"),
        OptimizerConfig(lr=1e-3),
        TrainConfig(steps=3, save_every=1, log_every=5, progress=False, tensorboard=False),
        tmp_path,
    )
    source = with_reference(Synthetic(), frozen_copy(model, cfg()))
    loss_fn = trainer.loss_fn

    def nan_at_step_2(*args):
        loss, metrics = loss_fn(*args)
        return (loss * float("nan") if source.pos > 2 else loss), metrics

    trainer.loss_fn = nan_at_step_2
    with pytest.raises(
        RuntimeError, match=r"^training diverged at step 2: loss nan, gradient norm nan; .*metrics\.jsonl"
    ):
        trainer.fit(source)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2] and lines[0]["loss"] != lines[0]["loss"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_a_run_that_stops_on_an_error_marks_its_wandb_run_failed(dist1, tmp_path, monkeypatch):
    """W&B is told the run failed (exit code 1), not that it finished, when a step raises; a whole run finishes."""
    import sys
    import types

    from shiq_train.trainer import LoggingConfig

    finished = []
    run = types.SimpleNamespace(log=lambda values, step: None, finish=lambda **kw: finished.append(kw))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))

    def trainer(out, steps):
        model = M.build_model(cfg())
        train_cfg = TrainConfig(steps=steps, progress=False, tensorboard=False)
        return Trainer(
            model, LossConfig("sft"), OptimizerConfig(lr=1e-3), train_cfg, out, logging_cfg=LoggingConfig(wandb=True)
        )

    source = Synthetic()
    good = source.next_micro_batches
    source.next_micro_batches = lambda: good() if source.pos < 2 else 1 / 0
    with pytest.raises(ZeroDivisionError):
        trainer(tmp_path / "a", 3).fit(source)
    trainer(tmp_path / "b", 1).fit(Synthetic())
    assert finished == [{"exit_code": 1}, {}]


@pytest.mark.parametrize(
    "steps, stop_at, complete, want",
    [
        (5, 2, False, [("mark_preempting", {}), ("finish", {"exit_code": 143})]),
        (3, 4, True, [("finish", {})]),
    ],
    ids=["resumable", "last-step"],
)
def test_a_run_saved_on_sigterm_marks_its_wandb_run_as_what_is_left(
    dist1, tmp_path, monkeypatch, steps, stop_at, complete, want
):
    """A run stopped by SIGTERM once its step is saved (resumable, ending with status 143) was marked failed with
    exit code 1 in W&B, like a crash. It is marked preempting (W&B's record of a run to be resumed) and finished
    with exit code 143, the status the process ends with. A SIGTERM during the last step saves it and the run is
    complete (SavedOnSigterm.complete: the command says so): its W&B run finishes as a whole run's does, not
    preempting and failed, waiting for a resume that has nothing left to do."""
    import os
    import signal
    import sys
    import types

    from shiq_train.trainer import LoggingConfig, SavedOnSigterm

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # the trainer would leave SIGTERM to its handler
        pytest.skip("SIGTERM is handled by the test runner")
    calls = []
    run = types.SimpleNamespace(
        log=lambda values, step: None,
        finish=lambda **kw: calls.append(("finish", kw)),
        mark_preempting=lambda: calls.append(("mark_preempting", {})),
    )
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    train_cfg = TrainConfig(steps=steps, progress=False, tensorboard=False)
    trainer = Trainer(
        M.build_model(cfg()), LossConfig("sft"), OptimizerConfig(lr=1e-3), train_cfg, tmp_path,
        logging_cfg=LoggingConfig(wandb=True),
    )  # fmt: skip
    source = Synthetic()
    nxt = source.next_micro_batches
    kill = lambda: os.kill(os.getpid(), signal.SIGTERM) if source.pos == stop_at else None  # noqa: E731
    source.next_micro_batches = lambda: (kill(), nxt())[1]
    with pytest.raises(SavedOnSigterm) as stopped:
        trainer.fit(source)
    assert stopped.value.complete == complete and calls == want


def test_resumed_run_equals_uninterrupted_run(dist1, tmp_path):
    mcfg = M.ModelConfig(vocab_size=VOCAB, max_sequence_length=SEQ, hidden_dropout=0.1)
    init = M.build_model(mcfg)
    ref = frozen_copy(init, mcfg)

    def run(out, steps):
        model = frozen_copy(init, mcfg).train()
        for p in model.parameters():
            p.requires_grad_(True)
        parallel.set_seed(7)  # the same dropout stream for every run (a resumed run restores its own)
        t = Trainer(
            model,
            LossConfig("shiq", beta=0.5),
            OptimizerConfig(lr=1e-3, warmup_steps=2, decay_steps=6),
            TrainConfig(steps=steps, save_every=2, progress=False, tensorboard=False),
            out,
        )
        return t.fit(with_reference(Synthetic(seed=1), ref)), model

    straight, m1 = run(tmp_path / "a", 6)
    first, _ = run(tmp_path / "b", 3)  # "killed" after step 3 (last checkpoint: step 3, the final one)
    second, m2 = run(tmp_path / "b", 6)
    assert [h["loss"] for h in first + second] == [h["loss"] for h in straight]
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    # A damaged run folder is refused, saying what to do, and left as it was (training would have cut the
    # metrics back, or started over at step 0 beside the old steps).
    metrics, latest = tmp_path / "b" / "metrics.jsonl", tmp_path / "b" / "checkpoints" / "latest"
    good = metrics.read_text()
    metrics.write_text(good + '{"marker": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 7: not a metrics record .*remove the line"):
        run(tmp_path / "b", 8)
    assert metrics.read_text() == good + '{"marker": 1}\n'
    metrics.write_text(good + '{"step": 7, "lo')  # a last line cut short by a kill: dropped when resuming
    assert [h["step"] for h in run(tmp_path / "b", 6)[0]] == []
    assert metrics.read_text() == good
    latest.unlink()
    with pytest.raises(ValueError, match=r"latest is missing but .* holds .*step_0*6: to resume, write"):
        run(tmp_path / "b", 8)
    assert metrics.read_text() == good and not latest.exists()

    # A first save killed before its meta.json (every rank file whole first): the run was refused for good,
    # the message's advice (write the step into latest) failing next; now such a step folder is no step: the
    # run starts over, and it is removed, as is one after the latest step of a run that resumes.
    c = tmp_path / "c" / "checkpoints"
    for run_dir, steps in ((c, ("step_00000002",)), (tmp_path / "a" / "checkpoints", ("step_00000008",))):
        for name in steps:
            (run_dir / name).mkdir(parents=True)
            (run_dir / name / ".rank_tp0_pp0_dp0.pt.k2j4x.tmp").write_bytes(b"half")
    assert [h["step"] for h in run(tmp_path / "c", 1)[0]] == [1]
    assert sorted(p.name for p in c.glob("step_*")) == ["step_00000001"]  # (the final step's save)
    copying = tmp_path / "a" / "checkpoints" / "step_00000001"  # before latest: not a killed save (a copy?)
    copying.mkdir()
    (copying / "rank_tp0_pp0_dp0.pt").write_bytes(b"being copied")
    assert [h["step"] for h in run(tmp_path / "a", 7)[0]] == [7]
    saved = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*"))
    assert saved[-2:] == ["step_00000006", "step_00000007"] and "step_00000008" not in saved
    assert (copying / "rank_tp0_pp0_dp0.pt").read_bytes() == b"being copied"

    # A link named like a step folder: a restart removed the temporary files it found through it, outside the
    # run. It is refused, by a resume as by export and evaluation, and what it leads to is left alone.
    from shiq_eval.checkpoints import EvalInputError, checkpoint_steps
    from shiq_train.export import step_dir_of

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".precious.tmp").write_text("theirs")
    shutil.copy(tmp_path / "a" / "checkpoints" / "step_00000007" / "meta.json", elsewhere / "meta.json")
    (tmp_path / "a" / "checkpoints" / "step_00000009").symlink_to(elsewhere)
    refused = r"step_0*9 is a symbolic link, not a step folder of .*: a run's checkpoints are its own folders"
    with pytest.raises(ValueError, match=refused):
        run(tmp_path / "a", 10)
    with pytest.raises(ValueError, match=refused):
        step_dir_of(tmp_path / "a", 9)
    with pytest.raises(EvalInputError, match=refused):
        checkpoint_steps(tmp_path / "a")
    assert (elsewhere / ".precious.tmp").read_text() == "theirs"


def test_online_reference_equals_precomputed(dist1, tmp_path):
    init = M.build_model(cfg())
    runs = {}
    for mode in ("precomputed", "online"):
        model, ref = frozen_copy(init, cfg()).train(), frozen_copy(init, cfg())
        for p in model.parameters():
            p.requires_grad_(True)
        src = Synthetic(seed=2)
        if mode == "precomputed":
            src = with_reference(src, ref)
        t = Trainer(
            model,
            LossConfig("copg", beta=0.3),
            OptimizerConfig(lr=1e-3),
            TrainConfig(steps=4, reference=mode, progress=False, tensorboard=False),
            tmp_path / mode,
            ref_model=ref,
        )
        runs[mode] = [h["loss"] for h in t.fit(src)]
    assert runs["online"] == pytest.approx(runs["precomputed"], rel=1e-6)


def test_only_the_last_layers_train_when_asked(dist1, tmp_path):
    model = M.build_model(cfg())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_layers = cfg().num_layers
    with pytest.raises(ValueError, match=rf"trainable_last_layers={n_layers + 1} is more than the model's {n_layers}"):
        freeze_all_but_last_layers(model, n_layers + 1)  # it trained every layer, not the embeddings, silently
    assert freeze_all_but_last_layers(model, n_layers) == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("decoder.layers.", "decoder.final_layernorm"))
    )
    n_trainable = freeze_all_but_last_layers(model, 1)
    assert n_trainable == sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith("decoder.layers.1.") or n.startswith("decoder.final_layernorm")
    )
    ref = frozen_copy(model, cfg())
    Trainer(
        model,
        LossConfig("shiq", beta=0.5),
        OptimizerConfig(lr=1e-2),
        TrainConfig(steps=2, trainable_last_layers=1, progress=False, tensorboard=False),
        tmp_path,
    ).fit(with_reference(Synthetic(), ref))
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n.startswith("decoder.layers.1.") or n.startswith("decoder.final_layernorm")), n


def test_online_reference_requires_a_model(dist1, tmp_path):
    with pytest.raises(ValueError, match="needs a reference model"):
        Trainer(M.build_model(cfg()), LossConfig(), OptimizerConfig(), TrainConfig(reference="online"), tmp_path)


def test_evaluation_hook_runs_at_eval_steps_and_changes_nothing(dist1, tmp_path):
    """eval_every=2, steps=6: the hook sees steps 2, 4, 6 after their checkpoints; it draws random
    numbers (torch's generator and megatron's tracker) and switches the model to eval mode, yet the
    losses (with dropout, so every draw matters) equal a run without the hook step for step; the model
    it sees at step 4 is the one a plain 4-step run ends with; a resumed run does not evaluate again."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    mcfg = M.ModelConfig(vocab_size=VOCAB, max_sequence_length=SEQ, hidden_dropout=0.2, attention_dropout=0.2)
    init = M.build_model(mcfg)
    ref = frozen_copy(init, mcfg)

    def run(out, steps, evaluate=None, eval_every=0):
        model = frozen_copy(init, mcfg).train()
        for p in model.parameters():
            p.requires_grad_(True)
        parallel.set_seed(7)
        t = Trainer(
            model,
            LossConfig("shiq", beta=0.5),
            OptimizerConfig(lr=1e-3, warmup_steps=2, decay_steps=6),
            TrainConfig(steps=steps, eval_every=eval_every, progress=False, tensorboard=False),
            out,
        )
        return t.fit(with_reference(Synthetic(seed=1), ref), evaluate=evaluate), model

    seen = {}

    def hook(step, model):
        seen[step] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "saved": sorted(p.name for p in (tmp_path / "hooked" / "checkpoints").glob("step_*")),
        }
        torch.rand(1000)
        with get_cuda_rng_tracker().fork():
            torch.rand(1000)
        model.eval()
        return {"draws": 2, "step_seen": step}

    plain, _ = run(tmp_path / "plain", 6)
    hooked, _ = run(tmp_path / "hooked", 6, hook, eval_every=2)
    assert sorted(seen) == [2, 4, 6]
    assert [h["loss"] for h in hooked] == [h["loss"] for h in plain]
    assert len({h["loss"] for h in plain}) == 6  # the losses are not trivially equal
    for step in (2, 4, 6):  # each step's checkpoint exists when the hook runs
        assert f"step_{step:08d}" in seen[step]["saved"]
    _, four = run(tmp_path / "four", 4)
    for n, p in four.named_parameters():
        assert torch.equal(seen[4]["params"][n], p), n
    assert not all(torch.equal(seen[2]["params"][n], p) for n, p in four.named_parameters())
    lines = [json.loads(x) for x in (tmp_path / "hooked" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x.get("eval/step_seen") for x in lines] == [None, 2, None, 4, None, 6]
    assert [h.get("eval/draws") for h in hooked] == [None, 2, None, 2, None, 2]

    # a killed run (last checkpoint: step 3, its final step, evaluated) resumes without evaluating 3 again
    seen.clear()
    first, _ = run(tmp_path / "hooked2", 3, lambda s, m: seen.setdefault(s, None), eval_every=2)
    second, _ = run(tmp_path / "hooked2", 6, lambda s, m: seen.setdefault(s, None), eval_every=2)
    assert list(seen) == [2, 3, 4, 6]
    assert [h["loss"] for h in first + second] == [h["loss"] for h in plain]

    # killed while evaluating step 4, after its checkpoint and before its line: the resume writes the line (the
    # step's training metrics, saved with the checkpoint; the evaluation's keys died with it), so the log reads
    # as the uninterrupted run's (its lines were lost for good)
    def killed_at_4(step, model):
        if step == 4:
            raise KeyboardInterrupt
        return {"step_seen": step}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", 6, killed_at_4, eval_every=2)
    assert [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    run(tmp_path / "killed", 6, lambda s, m: {"step_seen": s}, eval_every=2)
    got = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in got] == [1, 2, 3, 4, 5, 6]
    assert [x.get("eval/step_seen") for x in got] == [None, 2, None, None, None, 6]
    for x, y in zip(got, lines):  # the same training metrics as the uninterrupted run's (its speed aside)
        assert {k: v for k, v in x.items() if not k.startswith(("eval/", "tokens_per_s"))} == {
            k: v for k, v in y.items() if not k.startswith(("eval/", "tokens_per_s"))
        }
    # killed so while evaluating its last step: the same command again trains nothing but writes that line
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed_last", 4, killed_at_4, eval_every=2)
    again, _ = run(tmp_path / "killed_last", 4, lambda s, m: {"step_seen": s}, eval_every=2)
    got = [json.loads(x) for x in (tmp_path / "killed_last" / "metrics.jsonl").read_text().splitlines()]
    assert again == [] and [x["step"] for x in got] == [1, 2, 3, 4]


def test_eval_every_is_validated():
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)


def online_trainer(config, out):
    """``(model, Trainer)``: a ShiQ trainer of one step over a model of ``config``, its frozen copy the online
    reference."""
    model = M.build_model(config)
    t = Trainer(
        model,
        LossConfig("shiq", beta=0.5),
        OptimizerConfig(lr=1e-3),
        TrainConfig(steps=1, reference="online", progress=False, tensorboard=False),
        out,
        ref_model=frozen_copy(model, config),
    )
    return model, t


def test_validation_loss_runs_without_dropout_and_restores_the_mode(dist1, tmp_path):
    """The validation loss ran in training mode: with dropout, the same model on the same rows gave another
    loss each time (and drew from the generators training uses). It runs in eval mode, the loss of an eval-mode
    forward pass, and the model is left in training mode as it was."""
    from dataclasses import replace

    from shiq_train.train_step import forward_backward, objective_loss_fn

    model, t = online_trainer(replace(cfg(), hidden_dropout=0.5, attention_dropout=0.5), tmp_path)
    mbs = Synthetic(seed=4).next_micro_batches()
    model.train()
    batch = [dict(mb) for mb in mbs]  # (the online reference's statistics are added to it)
    first, again = t.validation_loss(batch), t.validation_loss([dict(mb) for mb in mbs])
    assert first == again and model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        loss_fn = objective_loss_fn(LossConfig("shiq", beta=0.5))
        want, _ = forward_backward(model, [dict(mb) for mb in batch], loss_fn, forward_only=True)
    assert first == pytest.approx(float(want), rel=1e-6)


def test_validation_loss_is_the_loss_a_step_reports_and_changes_nothing(dist1, tmp_path):
    """Trainer.validation_loss on a micro-batch list equals the loss the next training step reports on the
    same micro-batches (computed before its update), and leaves the parameters and the optimizer as they were."""
    model, t = online_trainer(cfg(), tmp_path)
    t.fit(Synthetic(seed=3))  # one update, so the policy differs from the reference
    mbs = Synthetic(seed=4).next_micro_batches()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    val = t.validation_loss([dict(mb) for mb in mbs])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all((g is None) == (p.grad is None) for g, p in zip(grads, model.parameters()))
    assert all(g is None or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))

    class Fixed:
        def next_micro_batches(self):
            return [dict(mb) for mb in mbs]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    t.cfg.steps = 2  # resumes from the step-1 checkpoint: the same parameters
    step = t.fit(Fixed())[0]
    assert step["step"] == 2 and step["loss"] == pytest.approx(val, rel=1e-6) and val > 0


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"log_every": 0}, "train.log_every must be >= 1 (the last step is always logged), got 0"),
        ({"save_every": -1}, "train.save_every must be >= 0 (0: only at the end), got -1"),
    ],
)
def test_log_every_and_save_every_are_refused_naming_the_bad_one(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(**kw)


def test_trainable_last_layers_is_all_or_at_least_one():
    """-1 trains everything, N >= 1 the last N layers; 0 (nothing would train) and other negative values are
    refused in one line naming the option, as is a value below -1 when freezing a model directly."""
    assert TrainConfig(trainable_last_layers=-1).trainable_last_layers == -1
    assert TrainConfig(trainable_last_layers=1).trainable_last_layers == 1
    with pytest.raises(ValueError, match=r"train.trainable_last_layers must be -1 .* got 0: 0 would train nothing"):
        TrainConfig(trainable_last_layers=0)
    for bad in (-2, -7, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"train.trainable_last_layers must be -1 .* got {bad!r}$"):
            TrainConfig(trainable_last_layers=bad)
    with pytest.raises(ValueError, match="trainable_last_layers must be -1 .* got -2"):
        freeze_all_but_last_layers(None, -2)


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        ("loss", "num_atoms", 1, "loss.num_atoms must be an integer >= 2, got 1"),
        ("loss", "head_lr", -1, "optimizer.lr (0.0003) and loss.head_lr (-1.0) must be > 0"),
        ("loss", "v_min", 1.0, "loss.v_min (1.0) and loss.v_max (0.0) must be finite, v_min < v_max"),
        ("loss", "gamma", 0.9, "loss.gamma must be 1, got 0.9"),
        ("train", "trainable_last_layers", -3, "train.trainable_last_layers must be -1"),
    ],
)
def test_value_model_settings_are_refused_by_the_runs_own_keys(section, key, value, needle):
    """shiq-train loss=qsharp_value named its settings value.num_atoms, value.lr, or v_min without a section, and
    refused v_min >= v_max only once the weights had loaded: each refusal names the run's key, before any work."""
    import pathlib

    from omegaconf import OmegaConf

    from shiq_train.qsharp_train import value_config_from_run

    cfg = OmegaConf.to_container(OmegaConf.load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "train.yaml"))
    cfg.update(loss={"name": "qsharp_value", "v_max": 0.0} if key == "v_min" else {"name": "qsharp_value"}, seed=0)
    cfg["data"]["seed"], cfg["optimizer"]["lr"] = 0, 3e-4
    cfg[section][key] = value
    with pytest.raises(ValueError) as e:
        value_config_from_run(cfg, 64)
    assert needle in str(e.value) and "value." not in str(e.value), str(e.value)


def test_value_model_trainable_last_layers_allows_the_head_alone():
    """Q♯'s value model trains its head whatever the trunk does: 0 is valid there, below -1 is not."""
    from shiq_train.qsharp_train import ValueTrainConfig

    assert ValueTrainConfig(trainable_last_layers=0).trainable_last_layers == 0
    for gamma in (0.9, 0.0):  # guidance by E[exp(Z/β)] is the optimum for the undiscounted return only
        with pytest.raises(ValueError, match=rf"value.gamma must be 1, got {gamma}"):
            ValueTrainConfig(gamma=gamma)
    with pytest.raises(ValueError, match=r"value.trainable_last_layers must be -1 .* got -3"):
        ValueTrainConfig(trainable_last_layers=-3)


def test_step_metrics_are_reduced_over_data_parallel_ranks_on_the_compute_device(dist1, monkeypatch):
    """The step's metrics are averaged over the data-parallel ranks by an all-reduce of a tensor on
    ``parallel.device()`` (nccl, the GPU's backend, reduces device tensors only) and come back as floats.
    Simulated in one process: two data-parallel ranks, the other one's metrics those of this one plus 1."""
    from megatron.core import parallel_state as ps

    from shiq_train import train_step as TS

    model = M.build_model(cfg())
    source = with_reference(Synthetic(), frozen_copy(model, cfg()))
    mbs = source.next_micro_batches()
    loss_fn = TS.objective_loss_fn(LossConfig("shiq", beta=0.5))
    _, alone = TS.forward_backward(model, [dict(mb) for mb in mbs], loss_fn, forward_only=True)

    dp_group, real_all_reduce, handed = ps.get_data_parallel_group(), torch.distributed.all_reduce, []

    def all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=None, **kwargs):
        if group is not dp_group:
            return real_all_reduce(t, op=op, group=group, **kwargs)
        handed.append(t.device)
        if t.device.type == "meta":
            raise RuntimeError("handed to the collective on the reported device")
        t.add_(1 if op == torch.distributed.ReduceOp.MAX else t + 1)  # the other rank's values: this one's + 1
        return None

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 2)
    _, mean = TS.forward_backward(model, [dict(mb) for mb in mbs], loss_fn, forward_only=True)
    assert handed == [parallel.device()] * 2  # the sums, then the maxima
    assert mean.keys() == alone.keys()
    assert all(isinstance(v, float) for v in mean.values())
    n, terms = alone["trajectories"], alone["loss_terms"]
    for k in alone:  # counts summed over the ranks, means over their trajectories or terms, the largest, the rest
        want = 2 * alone[k] + 1 if k in ("loss_terms", "trajectories") else alone[k] + 0.5
        if k in ("reward", "log_ratio"):
            want = (2 * alone[k] * n + 1) / (2 * n + 1)
        if k == "abs_delta_mean":
            want = (2 * alone[k] * terms + 1) / (2 * terms + 1)
        if k == "abs_delta_max":
            want = alone[k] + 1
        assert mean[k] == pytest.approx(want, rel=1e-12, abs=1e-12), k
    assert alone["loss_terms"] == sum(int(mb["action_mask"].sum()) for mb in mbs)  # ShiQ: every action
    # whatever device the helper reports is the one the tensor is on when it reaches the collective
    monkeypatch.setattr(TS, "device", lambda: torch.device("meta"))
    with pytest.raises(RuntimeError, match="on the reported device"):
        TS.forward_backward(model, [dict(mb) for mb in mbs], loss_fn, forward_only=True)
    assert handed[-1] == torch.device("meta")


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("lr", float("inf"), "optimizer.lr must be finite and > 0"),
        ("lr", 0.0, "optimizer.lr must be finite and > 0"),
        ("adam_beta1", 1.5, "optimizer.adam_beta1 must be in [0, 1)"),
        ("adam_beta2", 1.0, "optimizer.adam_beta2 must be in [0, 1)"),
        ("adam_eps", 0.0, "optimizer.adam_eps must be finite and > 0"),
        ("weight_decay", -0.1, "optimizer.weight_decay must be finite and >= 0"),
        ("clip_grad", float("nan"), "optimizer.clip_grad must be finite and >= 0"),
        ("warmup_steps", -1, "optimizer.warmup_steps and decay_steps must be >= 0"),
    ],
)
def test_optimizer_settings_adamw_cannot_use_are_refused_by_name(field, value, needle):
    """AdamW's settings are checked when the config is made, not at the first step: each message names the field."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        OptimizerConfig(**{field: value})
    OptimizerConfig(adam_beta1=0.0, adam_beta2=0.999, weight_decay=0.0, clip_grad=0.0)  # the edges that work


def test_a_trainer_used_from_python_draws_its_bar_whatever_the_logging(dist1, tmp_path, capsys, monkeypatch):
    """The commands draw no bar above INFO by setting train.progress off; the Trainer itself follows
    ``progress`` alone: a script whose logging is Python's default (WARNING) still gets the bar it asked for."""
    import logging

    monkeypatch.setattr(logging.getLogger("shiq_train"), "level", logging.WARNING)
    train_cfg = TrainConfig(steps=2, progress=True, tensorboard=False)
    Trainer(M.build_model(cfg()), LossConfig("sft"), OptimizerConfig(lr=1e-3), train_cfg, tmp_path).fit(Synthetic())
    assert "train sft" in capsys.readouterr().err


def test_a_metrics_line_giving_step_twice_is_refused_not_read_as_its_last(tmp_path):
    """A metrics.jsonl line with 'step' given twice was read as its last value: a resume cut the log back by a
    step the line may not be."""
    from shiq_train.trainer import _metric_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 5, "loss": 0.4, "step": 2}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: not a metrics record")):
        _metric_lines(path)
