"""Cost of the main job's evaluation of a fine-tuned policy: KL from two full passes against one shared pass.

``shiq-demo`` scores every checkpoint on the held-out prompts (:func:`shiq_eval.evaluate.evaluate_policy`):
sample a completion per prompt, then the exact KL to the reference along it. The policy trains only its
last layers, so it shares the reference's embeddings and first layers bit for bit. The two-pass path runs
both models over prompt + completion from the first layer; the shared path keeps the hidden states that
sampling computed at the first trained layer and runs only each model's later layers from there
(:class:`shiq_eval.evaluate.SharedPrefixPolicy`). The main job also keeps the prompts' pass through those
shared layers for every later policy (:class:`shiq_eval.evaluate.PromptPrefixes`, filled here before timing,
as the first evaluation of a run fills it). The baseline row samples with transformers' ``generate``, whose
draw costs a random number per vocabulary entry (the sampler this project used before; other draws, so
other completions). One run, side by side: SmolLM2-135M-Instruct as the
reference, and as the policy a copy whose last ``--trained`` layers are perturbed (what
training does to them); the main job's chat prompts around 6-word openings of held-out movie reviews.
Paths alternate in rounds, so load from other processes hits all alike; medians are reported, and each
path's completions and KLs are compared with those of the two full passes.

    python tools/bench_eval.py                     # 160 prompts, 24 new tokens, 6 trained layers, 3 rounds
    python tools/bench_eval.py --prompts 64 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per path, median seconds per evaluation (sampling, scoring and KL), its speed-up against "
        "the baseline, whether it sampled the same completions as the two full passes, and the largest KL difference "
        "per completion; then the same comparison of the shared pass with and without the prompts' pass kept.",
    )
    p.add_argument("--prompts", type=int, default=160, help="held-out prompts (default 160, the main job's)")
    p.add_argument("--new-tokens", type=int, default=24, help="new tokens per completion (default 24, the main job's)")
    p.add_argument("--trained", type=int, default=6, help="trained last layers of 30 (default 6, the main job's)")
    p.add_argument("--batch", type=int, default=64, help="prompts per batch (default 64, the main job's)")
    p.add_argument("--rounds", type=int, default=3, help="timed evaluations per path (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if min(args.prompts, args.new_tokens, args.batch, args.rounds, args.threads) < 1 or not 1 <= args.trained <= 29:
        p.error("--prompts, --new-tokens, --batch, --rounds, --threads must be >= 1 and --trained in 1..29")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import copy

    import torch

    from shiq_data.chat import user_prompt_ids
    from shiq_eval.evaluate import (
        PromptPrefixes,
        SharedPrefixPolicy,
        evaluate_one_pass,
        evaluate_policy,
        evaluate_samples,
        sequence_kls,
    )
    from shiq_eval.generate import HFPolicy
    from shiq_eval.moviereviews import movie_prompts
    from shiq_eval.shared_layers import shared_prefix_layers
    from shiq_train.hf_convert import load_smollm2

    torch.set_num_threads(args.threads)
    ref, tok = load_smollm2(torch.float32)
    ref.eval()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.layers[-args.trained :].parameters():  # the output layer is the (frozen) embedding
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    k = shared_prefix_layers(policy, ref)
    if k != len(ref.model.layers) - args.trained:
        raise SystemExit(f"bench_eval: the policy shares {k} layers with the reference, not the untrained ones")
    texts, openings = movie_prompts(args.prompts)
    ids = [user_prompt_ids(tok, t) for t in texts]
    completions = {}

    def recorder(name):
        """A scorer that keeps the texts it is given (scoring is not what is measured)."""

        def score(prompts, texts):
            completions[name] = list(texts)
            return [0.0] * len(texts)

        return score

    kw = dict(max_new_tokens=args.new_tokens, batch_size=args.batch, seed=3, progress=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def two_pass():
        kls = lambda p, c: sequence_kls(policy, ref, p, c, args.batch, pad)  # noqa: E731
        policy_ = HFPolicy(
            policy, eos_id=eos, pad_id=pad, share_prefix=False
        )  # every prompt whole, as the shared paths
        return evaluate_samples(policy_, kls, tok, ids, openings, recorder("two"), **kw)

    def shared():
        return evaluate_policy(policy, ref, tok, ids, openings, recorder("shared"), **kw)

    prefixes = PromptPrefixes(ref)
    evaluate_policy(policy, ref, tok, ids, openings, recorder("fill"), prompt_prefixes=prefixes, **kw)  # untimed

    def kept():
        return evaluate_policy(policy, ref, tok, ids, openings, recorder("kept"), prompt_prefixes=prefixes, **kw)

    def transformers_sampler():
        fused = SharedPrefixPolicy(policy, ref, k, eos_id=eos, pad_id=pad)
        fused.sampler = _TransformersGenerate(policy, eos, pad)
        return evaluate_one_pass(fused, tok, ids, openings, recorder("transformers"), **kw)

    paths = {
        f"shared first {k} layers, transformers' generate (baseline)": transformers_sampler,
        "two full passes": two_pass,
        f"shared first {k} layers": shared,
        f"shared first {k} layers, prompts' pass kept": kept,
    }
    times = {name: [] for name in paths}
    out = {}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    base_name, base = next(iter(out.items()))
    ours = out["two full passes"]
    print(
        f"SmolLM2-135M-Instruct (reference) and a copy with its last {args.trained} layers perturbed (policy), "
        f"{args.prompts} held-out prompts, {args.new_tokens} new tokens, batches of {args.batch}, {args.threads} "
        f"threads, median of {args.rounds} interleaved round(s); mean exact KL {ours.kl_exact:.3f} (baseline's "
        f"{base.kl_exact:.3f}: other draws)"
    )
    print()
    print("| path | seconds per evaluation | speed-up | same completions as two full passes | max KL difference |")
    print("|---|---|---|---|---|")
    t_base = statistics.median(times[base_name])
    tags = dict(zip(paths, ["transformers", "two", "shared", "kept"]))
    for name, res in out.items():
        t = statistics.median(times[name])
        if name == base_name:  # other draws: nothing to compare completion by completion
            print(f"| {name} | {t:.1f} | 1.00x | other draws | - |")
            continue
        same = completions[tags[name]] == completions["two"]
        dkl = max(abs(a - b) for a, b in zip(res.kls_exact, ours.kls_exact))
        print(f"| {name} | {t:.1f} | {t_base / t:.2f}x | {'yes' if same else 'no'} | {dkl:.1e} |")
    a, b = out[f"shared first {k} layers"], out[f"shared first {k} layers, prompts' pass kept"]
    dkl = max(abs(x - y) for x, y in zip(a.kls_exact + a.kls_sample, b.kls_exact + b.kls_sample))
    print()
    print(
        f"prompts' pass kept against not: same completions {'yes' if completions['kept'] == completions['shared'] else 'no'}, "
        f"max KL difference {dkl:.1e}"
    )


class _TransformersGenerate:
    """The baseline sampler: transformers' ``generate`` on left-padded prompts under ``torch.manual_seed``."""

    def __init__(self, model, eos: int, pad: int):
        self.model, self.eos, self.pad = model, eos, pad

    def _generate_batch(self, batch, cfg, seed, prefill=None):
        import torch

        from shiq_eval.generate import left_padded

        ids, attn, _ = left_padded(batch, self.pad)
        width = ids.shape[1]
        torch.manual_seed(seed)
        gen = self.model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
        )
        return gen[:, width:].tolist()


if __name__ == "__main__":
    main()
