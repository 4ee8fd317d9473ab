"""tools/memory_model.py (the planner's formulas) against independent references.

- Parameters per GPU: exact, against the tensors of a built tiny megatron GPT (tied and untied,
  multi-head and grouped-query), sharded over tensor and pipeline ranks with ``shiq_train.weights``.
- Gradients and AdamW state: exact, against the tensors after one step of ``build_optimizer``.
- The Llama presets' parameter counts: the published model sizes.
- Activations: the terms reduce to Korthikanti et al.'s per-layer table for a GPT layer.
- The command prints the table (flagging what does not fit) and one layout.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from shiq_train import model as M
from shiq_train import parallel
from shiq_train import weights as W
from shiq_train.train_step import OptimizerConfig, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import memory_model as mm  # noqa: E402
import plan_memory  # noqa: E402

CONFIGS = {
    "tied-mha": M.ModelConfig(num_layers=4),
    "untied-gqa": M.ModelConfig(
        num_layers=4, num_query_groups=2, ffn_hidden_size=96, share_embeddings_and_output_weights=False
    ),
    "qwen3-heads": M.ModelConfig(num_layers=4, num_query_groups=2, kv_channels=24, qk_layernorm=True),
}


@pytest.fixture(scope="module")
def built():
    warnings.filterwarnings("ignore")
    out = {}
    with parallel.distributed(seed=0):
        for name, cfg in CONFIGS.items():
            model = M.build_model(cfg)
            tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            st = M.forward_stats(model, tokens)
            (st.logz - st.chosen_logits).mean().backward()
            opt, _ = build_optimizer(model, OptimizerConfig())
            opt.step()
            out[name] = (cfg, {n: p.detach().clone() for n, p in model.named_parameters()}, model, opt)
        yield out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_gradients_optimizer_state_are_exact(built, name):
    cfg, _, model, opt = built[name]
    shape, lay = mm.Shape.from_model_config(cfg), mm.Layout(params_dtype="fp32", grad_dtype="fp32", dp=4)
    n = mm.stage_params(shape, lay, 0)
    assert mm.param_bytes(n, lay) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert mm.grad_bytes(n, lay) == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(
        t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
    )
    replicated = mm.Layout(params_dtype="fp32", dp=4, distributed_optimizer=False)
    assert mm.optimizer_bytes(n, replicated) == moments  # fp32 parameters: no master copy
    assert mm.optimizer_bytes(n, lay) == moments / 4  # ZeRO-1 over dp = 4


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1), (2, 2), (2, 4)])
def test_parameters_per_stage_match_the_sharded_model(built, name, tp, pp):
    cfg, full, _, _ = built[name]
    shape, lay = mm.Shape.from_model_config(cfg), mm.Layout(tp=tp, pp=pp)
    per_stage = W.layers_per_stage(cfg.num_layers, pp)
    expected = [0] * pp
    for key, t in full.items():
        dim, glu = W.tp_split(key, cfg.gated_linear_unit)
        size = W.shard_tensor(t, dim, glu, tp, 0).numel()
        if key.startswith(W.LAYER_PREFIX):
            expected[int(key[len(W.LAYER_PREFIX) :].split(".")[0]) // per_stage] += size
        elif key.startswith("embedding."):
            expected[0] += size
            if cfg.share_embeddings_and_output_weights and pp > 1:
                expected[-1] += size  # the output layer's copy of the tied embedding
        else:  # output layer, final norm
            expected[-1] += size
    assert [mm.stage_params(shape, lay, s) for s in range(pp)] == expected


def test_trainable_layers_count_only_the_trained_parameters(built):
    cfg, _, model, _ = built["untied-gqa"]
    shape = mm.Shape.from_model_config(cfg)
    trained = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("decoder.layers.3.", "decoder.final"))
    )
    assert mm.stage_trainable_params(shape, mm.Layout(trainable_layers=1), 0) == trained
    assert mm.stage_trainable_params(shape, mm.Layout(pp=2, trainable_layers=1), 0) == 0


def test_bf16_optimizer_state_has_fp32_masters():
    lay = mm.Layout(params_dtype="bf16", dp=8)
    assert mm.optimizer_bytes(1000, lay) == 1000 * 12 / 8
    assert mm.optimizer_bytes(1000, mm.Layout(params_dtype="bf16", distributed_optimizer=False)) == 12000


def test_llama_presets_have_the_published_sizes():
    assert mm.total_params(mm.PRESETS["8B"]) == 8_030_261_248
    assert mm.total_params(mm.PRESETS["70B"]) == 70_553_706_496


def test_activation_terms_reduce_to_the_gpt_table():
    """Korthikanti et al. 2022, Table 2: per layer, 16-bit activations, s·b·h·(...) bytes."""
    gpt = mm.Shape("gpt", 1, 1024, 16, 16, 4096, 1000, gated=False)
    s, b, h, a = 512, 2, 1024, 16
    sbh, att = s * b * h, 5 * a * s / h
    terms = mm.layer_activation_terms(gpt, s, b, dropout=True)
    assert sum(terms.values()) == pytest.approx(sbh * (34 + att))
    base = mm.Layout(seq=s, micro_batch=b, dropout=True, fused_attention=False)
    for t in (2, 8):
        tp = mm.Layout(**{**base.__dict__, "tp": t})
        assert mm.layer_activations(gpt, tp) == pytest.approx(sbh * (10 + 24 / t + att / t))
        sp = mm.Layout(**{**tp.__dict__, "sequence_parallel": True})
        assert mm.layer_activations(gpt, sp) == pytest.approx(sbh * (34 / t + att / t))
        sel = mm.Layout(**{**sp.__dict__, "recompute": "selective"})
        assert mm.layer_activations(gpt, sel) == pytest.approx(sbh * 34 / t)
        full = mm.Layout(**{**sp.__dict__, "recompute": "full"})
        assert mm.stage_activations(gpt, full, 0) == pytest.approx(2 * sbh / t * 3)  # input + embedding + output


def test_fp8_speeds_up_the_decoder_linear_layers_only():
    """FP8 halved the whole predicted step; Transformer Engine's FP8 GEMMs are the decoder layers' linear layers,
    and attention's products and the 128k-token output layer stay in bf16. Counted by hand for Llama-3.1-8B at
    4096 tokens, every layer trained, no recompute, precomputed reference statistics."""
    s, lay = mm.PRESETS["8B"], mm.Layout(dp=8)
    L, h, out = s.num_layers, s.hidden, s.vocab * s.hidden
    d = h // s.heads
    gemm = h * (s.heads + 2 * s.kv_groups) * d + s.heads * d * h + 3 * h * s.ffn  # a layer's linear weights
    lin = 3 * 2 * L * gemm  # forward, and a backward of twice the forward
    other = 3 * (2 * (L * 2 * h + out) + 4 * L * h * lay.seq) + 2 * h  # norms, output layer, attention products
    tokens = lay.dp * lay.micro_batches * lay.micro_batch * lay.seq
    assert mm.step_flop_parts(s, lay) == pytest.approx((lin * tokens, other * tokens), rel=1e-12)
    bf16, fp8 = mm.step_seconds(s, lay, "H100", 0.4), mm.step_seconds(s, mm.Layout(dp=8, fp8=True), "H100", 0.4)
    assert bf16 / fp8 == pytest.approx((lin + other) / (lin / 2 + other), rel=1e-12)
    assert 1.5 < bf16 / fp8 < 1.8  # not 2


def test_layouts_shiq_train_refuses_are_refused_here_too():
    """--vpp with micro-batches pp does not divide, and sequence parallelism over a length tp does not divide,
    were planned though shiq-train refuses them."""
    with pytest.raises(SystemExit, match="vpp=2 .* needs micro_batches=3 a multiple of pp=2"):
        plan_memory.main(["--model", "8B", "--tp", "2", "--pp", "2", "--vpp", "2", "--micro-batches", "3"])
    with pytest.raises(SystemExit, match="sequence parallelism needs seq=4095 divisible by tp=2"):
        plan_memory.main(["--model", "8B", "--tp", "2", "--seq", "4095", "--sequence-parallel"])


def test_table_flags_what_does_not_fit(capsys):
    assert plan_memory.main([]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("8B ", "70B "))]
    assert len(lines) == 22
    full_70b = [ln for ln in lines if ln.startswith("70B") and "tp8+sp pp1 dp1" in ln and "last" not in ln]
    assert full_70b and all(" NO " in ln for ln in full_70b if "bf16" not in ln)
    assert any(" yes " in ln for ln in lines if ln.startswith("8B"))


def test_one_layout_and_help(capsys):
    assert plan_memory.main(["--model", "8B", "--gpu", "H100", "--tp", "2", "--dp", "4", "--sequence-parallel"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("8B    H100 tp2+sp pp1 dp4")
    with pytest.raises(SystemExit, match="sequence parallelism needs tp > 1"):
        plan_memory.main(["--model", "8B", "--tp", "1", "--sequence-parallel"])
    with pytest.raises(SystemExit, match="--vpp 2: virtual pipeline stages interleave a pipeline, which needs --pp 2"):
        plan_memory.main(["--model", "8B", "--tp", "1", "--vpp", "2"])
    assert plan_memory.main(["--model", "70B", "--gpu", "H100", "--tp", "4", "--pp", "2", "--vpp", "2"]) == 0
    with pytest.raises(SystemExit):
        plan_memory.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and str(Path.cwd()) not in text


@pytest.mark.parametrize("name", ["tiny", "qwen3-heads"])
def test_validate_measures_what_it_predicts(built, name):
    """--validate's measurement of the tiny model: exact terms equal, activations kept within the
    stated CPU overhead of the local layers (1 to 1.5 times the formula in float32). With heads wider than
    hidden_size / num_attention_heads and query/key norms, the activations of the attention's own width (they
    were counted at hidden_size: measured 1.97 times the formula)."""
    cfg = CONFIGS.get(name, M.ModelConfig())
    for rc in ("none", "full"):
        got, want = plan_memory.measure(cfg, rc, 16, 2), plan_memory.predict(cfg, rc, 16, 2)
        assert {k: got[k] for k in ("params", "grads", "optimizer")} == {
            k: want[k] for k in ("params", "grads", "optimizer")
        }
        assert 1.0 <= got["activations"] / want["activations"] <= 1.5, rc


def test_interleaved_stages_hold_their_warmup_forwards():
    """Interleaved 1F1B: stage r runs 2·(pp − 1 − r) + (v − 1)·pp warm-up forwards of one chunk (1/v of its layers)
    before its first backward, then holds one more. The last stage of pp=4, v=2 holds 5 chunks (2.5 micro-batches'
    worth), not stage 0's 5.5 scaled down to 1.375; stage 0's 11 chunks are 5.5."""
    lay = mm.Layout(pp=4, vpp=2, micro_batches=64)
    assert [mm.in_flight(lay, r) for r in range(4)] == [11 / 2, 9 / 2, 7 / 2, 5 / 2]
    assert mm.in_flight(mm.Layout(pp=2, vpp=2, micro_batches=2), 0) == 2.0  # every chunk in the warm-up: M·v / v
    assert [mm.in_flight(mm.Layout(pp=4, micro_batches=64), r) for r in range(4)] == [4, 3, 2, 1]


def test_distributed_optimizer_shards_over_context_parallel_ranks_too():
    """megatron's distributed optimizer shards over the data- and context-parallel group (``dp_cp``): at DP=2 × CP=2,
    4 ranks hold 12 bytes per bf16 parameter between them."""
    assert mm.optimizer_bytes(1000, mm.Layout(dp=2, cp=2)) == 1000 * 12 / 4
    assert mm.optimizer_bytes(1000, mm.Layout(dp=2, cp=2, distributed_optimizer=False)) == 12000


def test_frozen_output_layer_costs_its_input_gradient_only():
    """With train.trainable_last_layers = k the output layer is frozen: its backward is the input gradient (2·V·h per
    token), not twice its forward. Counted by hand for Llama-3.1-70B, the last 16 layers trained, no recompute."""
    s, lay = mm.PRESETS["70B"], mm.Layout(tp=8, micro_batches=64, sequence_parallel=True, trainable_layers=16)
    L, k, h, a, g, d, f, V, seq = 80, 16, 8192, 64, 8, 128, 28672, 128256, 4096
    gemm = h * (a + 2 * g) * d + a * d * h + 3 * h * f  # a layer's linear weights
    attn = 4 * a * d * seq  # QK^T and AV, forward, per token and layer
    fwd = 2 * L * (gemm + 2 * h) + L * attn + 2 * (V * h + h)
    bwd = 2 * (2 * k * (gemm + 2 * h) + k * attn) + 2 * V * h
    assert mm.step_flops(s, lay) == pytest.approx((fwd + bwd) * 64 * seq, rel=1e-12)
    full = mm.Layout(**{**lay.__dict__, "recompute": "full"})
    assert mm.step_flops(s, full) == pytest.approx(
        (fwd + bwd + 2 * k * (gemm + 2 * h) + k * attn) * 64 * seq, rel=1e-12
    )


def test_readme_table_is_what_the_tool_prints(capsys):
    """Every row of the README's predicted table (GiB columns, fits on H100 / H200, step) is a row the tool prints."""
    assert plan_memory.main([]) == 0
    printed = {}
    for ln in capsys.readouterr().out.splitlines():
        if ln.startswith(("8B ", "70B ")):
            f = ln.split()
            gib, fits, step = tuple(f[-9:-3]), f[-3], float(f[-2])
            printed.setdefault((f[0], gib, f"{step:.1f} s" if step < 10 else f"{step:.0f} s"), {})[f[1]] = fits.lower()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith(("| 8B |", "| 70B |"))]
    assert len(rows) == 6
    for ln in rows:
        c = [x.strip() for x in ln.strip("|").split("|")]
        key = (c[0], tuple(c[2:8]), c[10])
        assert key in printed, ln
        assert printed[key] == {"H100": c[8], "H200": c[9]}, ln
