"""AdamW's step on CPU: the loop over tensors (torch's default there), foreach and fused.

The parameter sets have the shapes of the main job's: the last 6 of SmolLM2-135M's 30 layers and its final
norm (what ``train.trainable_last_layers=6`` trains) and MiniLM-L6's embeddings and 6 layers (what the reward
model's fine-tuning trains). Random gradients. Each way first takes one untimed step (a warm-up: it creates
the optimizer's state, the two moments, which no timed step then pays for); then the ways alternate in rounds,
in the listed order in even rounds (0, 2, ...) and reversed in odd ones, so load from other processes and the
order itself hit them alike. The three must update the same way: the largest difference of the parameters
after the same steps (the warm-up's and the timed ones), from the loop's, is printed too.

    python tools/bench_adamw.py                 # 20 steps a round, 3 rounds
"""

from __future__ import annotations

import statistics
import time

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per parameter set and way, the median milliseconds per step, the speed-up over the loop, "
        "and the largest parameter difference from the loop after the same steps.",
    )
    p.add_argument("--steps", type=_args.count, default=20, help="timed steps per way and round (default 20)")
    p.add_argument("--rounds", type=_args.count, default=3, help="rounds (default 3)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    return p.parse_args(argv)


def shapes(hidden: int, ffn: int, heads_kv: int, head_dim: int, layers: int, vocab: int = 0) -> list[tuple]:
    """Tensor shapes of ``layers`` Llama (``vocab`` 0) or BERT (``vocab`` > 0: embeddings too) layers."""
    if vocab == 0:  # Llama: q, k, v, o, gate, up, down, two norms; the final norm
        layer = [(hidden, hidden), (heads_kv * head_dim, hidden), (heads_kv * head_dim, hidden), (hidden, hidden)]
        layer += [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
        return layer * layers + [(hidden,)]
    # BERT: q, k, v, o with biases, attention norm, up, down with biases, output norm; embeddings and their norm
    layer = [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
    layer += [(hidden,), (hidden,)]
    return [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)] + layer * layers


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sets = {
        "SmolLM2-135M, last 6 layers": shapes(576, 1536, 3, 64, 6),
        "MiniLM-L6, whole": shapes(384, 1536, 0, 0, 6, vocab=30522),
    }
    ways = {"loop over tensors": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    print(
        f"AdamW (lr 1e-4, weight decay 0.01), one warm-up step per way, then {args.steps} steps a round, median "
        f"of {args.rounds} rounds, the order reversed every other round, {args.threads} threads"
    )
    print()
    print("| parameters | way | ms per step | speed-up | largest difference from the loop |")
    print("|---|---|---|---|---|")
    for name, shape_list in sets.items():
        g = torch.Generator().manual_seed(0)
        start = [torch.randn(s, generator=g) * 0.02 for s in shape_list]
        grads = [[torch.randn(s, generator=g) * 1e-3 for s in shape_list] for _ in range(3)]
        params = {w: [torch.nn.Parameter(t.clone()) for t in start] for w in ways}
        opts = {w: torch.optim.AdamW(params[w], lr=1e-4, weight_decay=0.01, **kw) for w, kw in ways.items()}
        for w in ways:  # warm-up, untimed: creates each way's AdamW state
            for p, gr in zip(params[w], grads[0]):
                p.grad = gr
            opts[w].step()
        times = {w: [] for w in ways}
        for r in range(args.rounds):
            for w in list(ways) if r % 2 == 0 else list(reversed(ways)):
                t0 = time.perf_counter()
                for step in range(args.steps):
                    for p, gr in zip(params[w], grads[step % 3]):
                        p.grad = gr
                    opts[w].step()
                times[w].append((time.perf_counter() - t0) / args.steps)
        n = sum(t.numel() for t in start)
        base = statistics.median(times["loop over tensors"])
        for w in ways:
            t = statistics.median(times[w])
            diff = max(float((a - b).detach().abs().max()) for a, b in zip(params[w], params["loop over tensors"]))
            label = f"{name} ({n / 1e6:.1f}M in {len(start)} tensors)"
            print(f"| {label} | {w} | {t * 1e3:.1f} | {base / t:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
