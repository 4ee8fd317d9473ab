"""The training loop on a tiny megatron model: learning, exact resume, online reference, freezing."""

import json
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


def test_eval_every_is_validated():
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)


def test_validation_loss_is_the_loss_a_step_reports_and_changes_nothing(dist1, tmp_path):
    """Trainer.validation_loss on a micro-batch list equals the loss the next training step reports on the
    same micro-batches (computed before its update), and leaves the parameters and the optimizer as they were."""
    model = M.build_model(cfg())
    ref = frozen_copy(model, cfg())
    t = Trainer(
        model,
        LossConfig("shiq", beta=0.5),
        OptimizerConfig(lr=1e-3),
        TrainConfig(steps=1, reference="online", progress=False, tensorboard=False),
        tmp_path,
        ref_model=ref,
    )
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
