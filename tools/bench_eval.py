"""Cost of the main job's evaluation of a fine-tuned policy: KL from two full passes against one shared pass.

``shiq-demo`` scores every checkpoint on the held-out prompts (:func:`shiq_eval.evaluate.evaluate_policy`):
sample a completion per prompt, then the exact KL to the reference along it. The policy trains only its
last layers, so it shares the reference's embeddings and first layers bit for bit. The two-pass path (the
baseline) runs both models over prompt + completion from the first layer. The shared path
(:class:`shiq_eval.evaluate.SharedPrefixPolicy`) reads the prompts' pass through the shared layers from a
store (:class:`shiq_eval.evaluate.PromptPrefixes`; one per batch, or one kept for every later policy as the
main job does, filled here before timing as a run's first evaluation fills it), keeps the logits each token
was drawn from as the policy's, and runs only the reference's later layers, over the completion tokens. The
row "both models' later layers over prompt + completion" is the shared path as it was before that: with
the kept store, both models' later layers ran again over every prompt and completion position and the
float64 log-softmaxes covered the whole batch (kept in this script as a baseline). One run, side by side:
SmolLM2-135M-Instruct as the reference, and as the policy a copy whose last ``--trained`` layers are
perturbed (what training does to them); the main job's chat prompts around 6-word openings of held-out
movie reviews. Each path first evaluates the first batch of prompts untimed (a warm-up: first-call costs
fall on no timed evaluation); then the paths alternate in rounds, in the listed order in even rounds (0, 2,
...) and reversed in odd ones, so load from other processes and the order itself hit them alike; medians are
reported, and each path's completions and KLs are compared with those of the two full passes.

    python tools/bench_eval.py                     # 160 prompts, 24 new tokens, 6 trained layers, 3 rounds
    python tools/bench_eval.py --prompts 64 --rounds 1
"""

from __future__ import annotations

import statistics
import time
import warnings

import _args

from shiq_data.cli_common import ArgumentParser


def parse_args(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints, per path, median seconds per evaluation (sampling, scoring and KL), its speed-up against "
        "the baseline, whether it sampled the same completions as the two full passes, and the largest KL difference "
        "per completion; then the same comparison of the shared pass with and without the prompts' pass kept.",
    )
    p.add_argument("--prompts", type=_args.count, default=160, help="held-out prompts (default 160, the main job's)")
    p.add_argument(
        "--new-tokens", type=_args.count, default=24, help="new tokens per completion (default 24, the main job's)"
    )
    p.add_argument(
        "--trained", type=_args.integer(1, 29), default=6, help="trained last layers of 30 (default 6, the main job's)"
    )
    p.add_argument("--batch", type=_args.count, default=64, help="prompts per batch (default 64, the main job's)")
    p.add_argument("--rounds", type=_args.count, default=3, help="timed evaluations per path (default 3)")
    p.add_argument("--threads", type=_args.threads, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if args.prompts > (held_out := _args.movie_prompt_count()):
        p.error(f"--prompts: there are {held_out} held-out movie prompts, got {args.prompts}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import copy

    import torch

    from shiq_data.chat import user_prompt_ids
    from shiq_eval.evaluate import (
        PromptPrefixes,
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

    def two_pass(ids=ids, openings=openings):
        kls = lambda p, c: sequence_kls(policy, ref, p, c, args.batch, pad)  # noqa: E731
        policy_ = HFPolicy(
            policy, eos_id=eos, pad_id=pad, share_prefix=False
        )  # every prompt whole, as the shared paths
        return evaluate_samples(policy_, kls, tok, ids, openings, recorder("two"), **kw)

    def shared(ids=ids, openings=openings):
        return evaluate_policy(policy, ref, tok, ids, openings, recorder("shared"), **kw)

    prefixes = PromptPrefixes(ref)
    evaluate_policy(policy, ref, tok, ids, openings, recorder("fill"), prompt_prefixes=prefixes, **kw)  # untimed

    def kept(ids=ids, openings=openings):
        return evaluate_policy(policy, ref, tok, ids, openings, recorder("kept"), prompt_prefixes=prefixes, **kw)

    def before(ids=ids, openings=openings):
        fused = _BothTails(policy, ref, k, eos_id=eos, pad_id=pad, prompt_prefixes=prefixes)
        return evaluate_one_pass(fused, tok, ids, openings, recorder("before"), **kw)

    paths = {
        "two full passes (baseline)": two_pass,
        f"shared first {k} layers, prompts' pass kept, both models' later layers over prompt + completion "
        "(before)": before,
        f"shared first {k} layers": shared,
        f"shared first {k} layers, prompts' pass kept": kept,
    }
    for fn in paths.values():  # warm-up, untimed: the first batch (the timed batches' shape)
        fn(ids[: args.batch], openings[: args.batch])
    times = {name: [] for name in paths}
    out = {}
    for r in range(args.rounds):
        for name in list(paths) if r % 2 == 0 else list(reversed(paths)):
            t0 = time.perf_counter()
            out[name] = paths[name]()
            times[name].append(time.perf_counter() - t0)
    out = {name: out[name] for name in paths}  # in the listed order
    base_name, ours = next(iter(out.items()))
    print(
        f"SmolLM2-135M-Instruct (reference) and a copy with its last {args.trained} layers perturbed (policy), "
        f"{args.prompts} held-out prompts, {args.new_tokens} new tokens, batches of {args.batch}, {args.threads} "
        f"threads, after a warm-up batch of each path, median of {args.rounds} interleaved round(s), the order "
        f"reversed every other round; mean exact KL {ours.kl_exact:.3f}"
    )
    print()
    print("| path | seconds per evaluation | speed-up | same completions as two full passes | max KL difference |")
    print("|---|---|---|---|---|")
    t_base = statistics.median(times[base_name])
    tags = dict(zip(paths, ["two", "before", "shared", "kept"]))
    for name, res in out.items():
        t = statistics.median(times[name])
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


class _BothTails:
    """The shared path before: after sampling (prompts' pass from the store), both models' layers ``k ..`` over
    every prompt and completion position, then float64 log-softmaxes of the whole ``[B, n, V]`` logits."""

    def __init__(self, model, ref_model, k, *, eos_id, pad_id, prompt_prefixes):
        from shiq_eval.evaluate import SharedPrefixPolicy
        from shiq_eval.shared_layers import decoder_from

        self.fused = SharedPrefixPolicy(
            model, ref_model, k, eos_id=eos_id, pad_id=pad_id, prompt_prefixes=prompt_prefixes
        )
        self.tails = [(net, decoder_from(net, k)) for net in (model, ref_model)]

    def generate_with_kls(self, prompt_ids, cfg, progress=False):
        import torch

        from shiq_eval.generate import cut_at_eos, generate_in_batches, left_padded
        from shiq_eval.kl import exact_token_kl, kl_from_log_probs, sample_kl
        from shiq_eval.shared_layers import inputs_of_layer

        f, sample, exact = self.fused, [], []

        def batch_fn(batch, first, seed):
            f.prefixes.get(*left_padded(batch, f.sampler.pad_id), f.k)
            with inputs_of_layer(f.model, f.k) as captured:
                rows = f.sampler._generate_batch(batch, cfg, seed, lambda *a: f._prefill(f.prefixes, *a))
            hidden = torch.cat(captured, 1)  # [B, W + n - 1, H]
            W, n = max(len(p) for p in batch), len(rows[0])
            attn = torch.zeros(hidden.shape[:2], dtype=torch.long)
            for j, p in enumerate(batch):
                attn[j, W - len(p) :] = 1
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            targets = torch.tensor(rows)[..., None]  # [B, n, 1]
            mask = torch.zeros((len(rows), n), dtype=torch.bool)
            for j, row in enumerate(rows):
                mask[j, : len(cut_at_eos(row, f.eos_id))] = True
            logp, logq = (
                torch.log_softmax(
                    net.lm_head(
                        inner(
                            inputs_embeds=hidden, attention_mask=attn, position_ids=positions, use_cache=False
                        ).last_hidden_state[:, -n:]
                    ).double(),
                    -1,
                )
                for net, inner in self.tails
            )  # [B, n, V]
            sample.append(sample_kl(logp.gather(-1, targets)[..., 0], logq.gather(-1, targets)[..., 0], mask))
            exact.append(exact_token_kl(kl_from_log_probs(logp, logq), mask))
            return rows

        with torch.no_grad():
            completions = generate_in_batches(prompt_ids, cfg, progress, f.eos_id, batch_fn)
        return completions, torch.cat(sample), torch.cat(exact)


if __name__ == "__main__":
    main()
