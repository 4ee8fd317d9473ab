"""Predicted memory per GPU and step time of ShiQ training of Llama 8B / 70B under megatron layouts.

Without --tp, prints a table of a few layouts of Llama-3.1-8B and -70B on H100 (80 GB) and H200 (141 GB)
GPUs, 8 of them but where a row says otherwise, flagging those that do not fit. With --tp (and the other layout options) prints the terms of
that one layout. --validate builds small megatron GPTs on this machine's CPU and compares the terms that
can be measured (parameters, gradients, optimizer state: exact counts; activations kept for the
backward: the bytes of the tensors autograd saves) with the prediction. The formulas are in
tools/memory_model.py.

    .venv/bin/python tools/plan_memory.py                       # the table
    .venv/bin/python tools/plan_memory.py --model 70B --gpu H200 --tp 8 --sequence-parallel --recompute full \\
        --logits-chunk-tokens 4096 --trainable-layers 16
    .venv/bin/python tools/plan_memory.py --validate            # measured / predicted on CPU
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _args  # noqa: E402
import memory_model as mm  # noqa: E402  (a module next to this script)

from shiq_data.cli_common import ArgumentParser

GIB = mm.GiB
# the options of the one layout --tp prints (parse_args' names)
LAYOUT_OPTIONS = (
    "pp dp cp vpp seq micro_batch micro_batches recompute sequence_parallel no_distributed_optimizer params_dtype "
    "grad_dtype fp8 unfused_attention logits_chunk_tokens reference trainable_layers"
).split()


def refuse(message: str):
    """Exit as the parser does on a bad value (one line on stderr, status 2), the message kept on the exception."""
    text = f"{Path(sys.argv[0]).name}: error: {message}"
    print(text, file=sys.stderr)
    e = SystemExit(text)
    e.code = 2
    raise e


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="All figures are predictions from formulas, except the measured column of --validate. "
        "Sizes in GiB. A layout fits if its total leaves 6 GiB of the GPU free.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(mm.PRESETS), action="append", help="preset shape (default: 8B and 70B)")
    p.add_argument("--gpu", choices=sorted(mm.PEAK_TFLOPS), action="append", help="GPU (default: H100 and H200)")
    p.add_argument(
        "--tp",
        type=_args.count,
        help="tensor-parallel size; giving it prints that one layout (the options below) instead of the table",
    )
    p.add_argument("--pp", type=_args.count, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--dp", type=_args.count, default=1, help="data-parallel size (default 1)")
    p.add_argument("--cp", type=_args.count, default=1, help="context-parallel size (default 1)")
    p.add_argument("--vpp", type=_args.count, default=1, help="virtual pipeline stages per GPU (default 1)")
    p.add_argument("--seq", type=_args.count, default=4096, help="sequence length in tokens (default 4096)")
    p.add_argument("--micro-batch", type=_args.count, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument(
        "--micro-batches", type=_args.count, default=8, help="micro-batches per step and DP rank (default 8)"
    )
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none", help="default none")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs tp > 1)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer state replicated over DP")
    p.add_argument("--params-dtype", choices=["bf16", "fp32"], default="bf16", help="default bf16")
    p.add_argument("--grad-dtype", choices=["bf16", "fp32"], default="fp32", help="grad buffer (default fp32)")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs (Transformer Engine, delayed scaling)")
    p.add_argument("--unfused-attention", action="store_true", help="attention keeps its a*s*s scores")
    p.add_argument(
        "--logits-chunk-tokens", type=_args.count_or_zero, default=0, help="0: full logits (default); N: N at a time"
    )
    p.add_argument("--reference", choices=["precomputed", "online"], default="precomputed", help="default precomputed")
    p.add_argument(
        "--trainable-layers", type=_args.layers_or_all, default=-1, help="-1: all (default); k: the last k layers"
    )
    p.add_argument("--mfu", type=_args.fraction, default=0.40, help="fraction of peak FLOP/s achieved (default 0.40)")
    p.add_argument("--validate", action="store_true", help="measure small CPU models against the prediction")
    args = p.parse_args(argv)
    layout = [f"--{k.replace('_', '-')}" for k in LAYOUT_OPTIONS if getattr(args, k) != p.get_default(k)]
    if args.validate and (args.model or args.gpu or args.tp is not None or layout or args.mfu != p.get_default("mfu")):
        p.error("--validate measures fixed small CPU models: give it alone")
    if args.tp is None and layout:
        p.error(f"{', '.join(layout)}: an option of the one layout --tp prints; give --tp too (the table's are fixed)")
    if args.sequence_parallel and args.tp == 1:
        refuse("--sequence-parallel: sequence parallelism needs tp > 1 (--tp)")
    if args.vpp > 1 and args.pp < 2:
        refuse(f"--vpp {args.vpp}: virtual pipeline stages interleave a pipeline, which needs --pp 2 or more")
    return args


# ----------------------------------------------------------------------------------------------
# the table


def default_layouts() -> list[tuple[str, str, mm.Layout]]:
    """``(model, note, layout)`` rows: 8 GPUs, 4096-token sequences, 64 sequences per step."""
    base = mm.Layout(seq=4096, micro_batch=1)
    sp8 = replace(base, tp=8, micro_batches=64, sequence_parallel=True)
    rows = [
        ("8B", "", replace(base, dp=8, micro_batches=8)),
        ("8B", "", replace(base, dp=8, micro_batches=8, recompute="full")),
        ("8B", "", replace(base, dp=8, micro_batch=4, micro_batches=2, recompute="full", logits_chunk_tokens=1024)),
        ("8B", "", replace(base, tp=2, dp=4, micro_batches=16, sequence_parallel=True)),
        ("8B", "online ref", replace(base, tp=2, dp=4, micro_batches=16, sequence_parallel=True, reference="online")),
        ("70B", "", replace(sp8, recompute="full")),
        ("70B", "", replace(sp8, tp=4, pp=2, recompute="full")),
        ("70B", "bf16 grads", replace(sp8, recompute="full", grad_dtype="bf16")),
        ("70B", "last 16 layers", replace(sp8, trainable_layers=16)),
        ("70B", "last 40 layers", replace(sp8, recompute="full", trainable_layers=40)),
        ("70B", "32 GPUs", replace(sp8, pp=2, dp=2, micro_batches=32, recompute="full")),
    ]
    return rows


def describe(lay: mm.Layout) -> str:
    parts = [f"tp{lay.tp}" + ("+sp" if lay.sequence_parallel else ""), f"pp{lay.pp}", f"dp{lay.dp}"]
    if lay.cp > 1:
        parts.append(f"cp{lay.cp}")
    if lay.vpp > 1:
        parts.append(f"vpp{lay.vpp}")
    parts.append(f"mb{lay.micro_batch}x{lay.micro_batches}")
    parts.append({"none": "no-rc", "selective": "sel-rc", "full": "full-rc"}[lay.recompute])
    parts.append(f"chunk{lay.logits_chunk_tokens}" if lay.logits_chunk_tokens else "full-logits")
    if not lay.distributed_optimizer:
        parts.append("no-distopt")
    if lay.fp8:
        parts.append("fp8")
    return " ".join(parts)


HEADER = (
    f"{'model':5} {'GPU':4} {'layout':48} {'note':14} {'param':>6} {'grad':>6} {'optim':>6} {'act':>6} "
    f"{'stats':>6} {'total':>6}  {'fits':4} {'step s':>7} {'tok/s/GPU':>9}"
)


def row(model: str, gpu: str, note: str, p: mm.Plan) -> str:
    g = [x / GIB for x in (p.param_bytes + p.reference_bytes, p.grad_bytes, p.optimizer_bytes)]
    tokens = p.layout.dp * p.layout.micro_batches * p.layout.micro_batch * p.layout.seq
    ok = "yes" if mm.fits(p, gpu) else "NO"
    return (
        f"{model:5} {gpu:4} {describe(p.layout):48} {note:14} {g[0]:6.1f} {g[1]:6.1f} {g[2]:6.1f} "
        f"{p.activation_bytes / GIB:6.1f} {p.stats_bytes / GIB:6.1f} {p.total_bytes / GIB:6.1f}  {ok:4} "
        f"{p.step_s:7.2f} {tokens / p.step_s / p.layout.gpus:9.0f}"
    )


def print_table(models, gpus, mfu) -> None:
    print(
        f"Predicted memory per GPU (GiB, the fullest pipeline stage) and step time at {mfu:.0%} of peak "
        f"({mm.PEAK_TFLOPS['H100']:.0f} TFLOP/s bf16 dense); AdamW, bf16 parameters, fp32 grad buffer, "
        "distributed optimizer, fused attention, 64 sequences x 4096 tokens per step; "
        "param includes the online reference copy where noted."
    )
    print(HEADER)
    for model, note, lay in default_layouts():
        if model not in models:
            continue
        for gpu in gpus:
            print(row(model, gpu, note, mm.plan(mm.PRESETS[model], lay, gpu, mfu)))


# ----------------------------------------------------------------------------------------------
# measured against predicted on CPU


def _saved_bytes(fn, params) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs (parameters
    excluded), and ``fn``'s result."""
    import torch  # heavy: only --validate needs it

    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(model_cfg, recompute: str, seq: int, batch: int) -> dict:
    """Measured bytes of a TP=1, PP=1 model on CPU: parameters, gradients and AdamW state after one
    step (shiq_train.train_step.build_optimizer), and the activations one forward keeps."""
    import torch  # heavy: only --validate needs it

    from shiq_train import model as M
    from shiq_train.train_step import OptimizerConfig, build_optimizer

    cfg = replace(model_cfg, recompute=recompute)
    model = M.build_model(cfg)
    params = list(model.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    kept, st = _saved_bytes(lambda: M.forward_stats(model, tokens), params)
    (st.logz - st.chosen_logits).mean().backward()
    opt, _ = build_optimizer(model, OptimizerConfig(lr=1e-3))
    opt.step()
    inner = getattr(opt, "inner", opt)
    moments = sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for k, t in state.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    masters = sum(m.numel() * m.element_size() for m in getattr(opt, "masters", []))
    return {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "optimizer": moments + masters,
        "activations": kept,
    }


def predict(model_cfg, recompute: str, seq: int, batch: int) -> dict:
    """The planner's terms for the same run (one micro-batch, unfused CPU attention, no DP)."""
    shape = mm.Shape.from_model_config(model_cfg)
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[model_cfg.params_dtype]
    lay = mm.Layout(
        seq=seq,
        micro_batch=batch,
        micro_batches=1,
        recompute=recompute,
        params_dtype=dtype,
        grad_dtype=dtype,  # the shiq trainer's param.grad
        distributed_optimizer=False,
        fused_attention=False,
        dropout=model_cfg.hidden_dropout > 0,
        logits_chunk_tokens=model_cfg.logits_chunk_tokens,
    )
    n = mm.stage_params(shape, lay, 0)
    retained_stats = seq * batch * shape.vocab * 4  # the float32 softmax kept for the backward
    return {
        "params": mm.param_bytes(n, lay),
        "grads": mm.grad_bytes(n, lay),
        "optimizer": mm.optimizer_bytes(n, lay),
        "activations": mm.stage_activations(shape, lay, 0) + retained_stats,
    }


def validation_configs():
    from shiq_train.model import ModelConfig

    small = dict(num_layers=2, hidden_size=256, num_attention_heads=8, ffn_hidden_size=688, vocab_size=1024)
    return [
        ("tiny fp32", ModelConfig(), 16, 2),
        ("small fp32", ModelConfig(**small, max_sequence_length=128), 128, 2),
        ("small bf16", ModelConfig(**small, max_sequence_length=128, params_dtype="bfloat16"), 128, 2),
        (
            "small untied GQA",
            ModelConfig(
                **small, max_sequence_length=128, num_query_groups=2, share_embeddings_and_output_weights=False
            ),
            128,
            2,
        ),
    ]


def validate() -> list[tuple[str, str, str, int, float]]:
    """``(config, recompute, term, measured, predicted)`` rows."""
    import torch  # heavy: only --validate needs it

    from shiq_train import parallel

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = []
    with parallel.distributed(seed=0):
        for name, cfg, seq, batch in validation_configs():
            for rc in ("none", "selective", "full"):
                got, want = measure(cfg, rc, seq, batch), predict(cfg, rc, seq, batch)
                for term in got:
                    if rc == "none" or term == "activations":
                        out.append((name, rc, term, got[term], want[term]))
    return out


def print_validation(rows) -> None:
    print("Measured on CPU (megatron GPT, local layers, TP=1, PP=1, one micro-batch) against predicted.")
    print("params/grads/optimizer: summed tensor storage (AdamW moments and fp32 master copies) after one step;")
    print("activations: bytes of the distinct storages autograd keeps for the backward (parameters excluded),")
    print("predicted with unfused attention, plus the float32 softmax the statistics keep.")
    print("The CPU's local layers keep more than the formula's fused GPU layers: the unfused RMSNorm keeps its")
    print("normalised output, V is a view that keeps the whole QKV output alive, bf16 runs keep the softmax in")
    print("float32 too, and local norms hold float32 weights in bf16 runs (the bf16 params/grads ratio).")
    print(f"{'config':18} {'recompute':9} {'term':11} {'measured':>12} {'predicted':>12} {'ratio':>6}")
    for name, rc, term, got, want in rows:
        print(f"{name:18} {rc:9} {term:11} {got:12,d} {int(want):12,d} {got / want:6.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.validate:
        print_validation(validate())
        return 0
    models = args.model or ["8B", "70B"]
    gpus = args.gpu or ["H100", "H200"]
    if args.tp is None:
        print_table(models, gpus, args.mfu)
        return 0
    lay = mm.Layout(
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        cp=args.cp,
        vpp=args.vpp,
        seq=args.seq,
        micro_batch=args.micro_batch,
        micro_batches=args.micro_batches,
        recompute=args.recompute,
        sequence_parallel=args.sequence_parallel,
        distributed_optimizer=not args.no_distributed_optimizer,
        params_dtype=args.params_dtype,
        grad_dtype=args.grad_dtype,
        fp8=args.fp8,
        fused_attention=not args.unfused_attention,
        logits_chunk_tokens=args.logits_chunk_tokens,
        reference=args.reference,
        trainable_layers=args.trainable_layers,
    )
    plans = []
    for model in models:
        for gpu in gpus:
            try:
                plans.append((model, gpu, mm.plan(mm.PRESETS[model], lay, gpu, args.mfu)))
            except ValueError as e:
                refuse(f"the layout given does not fit model {model}: {e}")
    print(HEADER)
    for model, gpu, p in plans:
        print(row(model, gpu, "", p))
    if args.cp > 1:
        print("note: shiq-train refuses parallel.cp > 1 for now (see shiq_train.parallel.check_context_parallel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
