"""TreePO's efficiency claim on our sampler: tree sampling vs i.i.d. sampling of the same group size.

The paper (section 4.1) reports trajectories per second and model-processed tokens for segment
tree sampling vs w independent samples per prompt with the same token budget. Here both run side
by side in one process on the tiny model, alternating, same problems, same w and budget L * d:
- i.i.d.: sampler.generate(prompts, n=w, max_new_tokens=L * d), the CISPO baseline's call;
- tree: treepo.treepo_rollouts (one sampler call per round; shared segments sampled once).
TorchSampler keeps no KV cache across calls, so every round re-encodes each distinct context;
the last line gives the forward tokens a cross-call prefix cache (vLLM/SGLang radix) would leave.

    python benchmarks/treepo.py --problems 8 --repeats 2
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import countdown
import tiny
import treepo
from sampler import TorchSampler
from value_head import load_policy


@dataclass
class Args:
    """Benchmark knobs; tree defaults are TreePOConfig's (tiny-model segment length and depth)."""

    model: str = "tiny"  # "tiny" (built and cached on first use) or a local dir
    problems: int = 8  # prompts per call (trees grown together in the same sampler calls)
    width: int = 16  # w: group size, trajectories per prompt for both methods
    segment_len: int = 16  # L
    max_depth: int = 6  # d; the i.i.d. budget is L * d tokens per sample
    branch: int = 2  # b
    repeats: int = 2  # alternating runs of each method (times and counts are summed)
    threads: int = 2  # torch threads (the CPU box has 2 cores)
    seed: int = 0


def run_iid(problems, sampler, cfg: treepo.TreePOConfig) -> dict:
    prompts = [countdown.prompt_ids(p, sampler.tokenizer) for p in problems]
    gen0, fwd0, start = sampler.tokens_generated, sampler.forward_tokens, time.perf_counter()
    outs = sampler.generate(prompts, n=cfg.width, max_new_tokens=cfg.segment_len * cfg.max_depth,
                            temperature=cfg.temperature, stop=(countdown.ANSWER_CLOSE,))
    seconds = time.perf_counter() - start
    correct = [countdown.sparse_reward(c.text, p) for p, group in zip(problems, outs) for c in group]
    generated = sampler.tokens_generated - gen0
    return {"seconds": seconds, "trajectories": len(correct), "tokens_generated": generated,
            "forward_tokens": sampler.forward_tokens - fwd0, "correct": sum(correct),
            "trajectory_tokens": generated, "cached_forward": sum(map(len, prompts)) + generated}


def run_tree(problems, sampler, cfg: treepo.TreePOConfig) -> dict:
    start = time.perf_counter()
    out = treepo.treepo_rollouts(problems, sampler, cfg)
    seconds = time.perf_counter() - start
    stats = out[0]["stats"]
    correct = [countdown.sparse_reward(sampler.tokenizer.decode(t["tokens"], skip_special_tokens=True),
                                       problems[t["group"]]) for t in out]
    prompts = sum(len(out[i]["prompt_ids"]) for i in range(0, len(out), cfg.width))
    return {"seconds": seconds, "trajectories": stats["trajectories"],
            "tokens_generated": stats["tokens_generated"], "forward_tokens": stats["forward_tokens"],
            "correct": sum(correct), "trajectory_tokens": sum(len(t["tokens"]) for t in out),
            "cached_forward": prompts + stats["tokens_generated"], "calls": stats["sampler_calls"],
            "fallbacks": stats["fallbacks"]}


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    policy, tokenizer = load_policy(tiny.resolve_model(args.model))
    sampler = TorchSampler(policy, tokenizer, seed=args.seed)
    problems = countdown.make_splits(args.seed, n_train=0, n_test=args.problems)[1]
    cfg = treepo.TreePOConfig(segment_len=args.segment_len, max_depth=args.max_depth,
                              branch=args.branch, width=args.width, seed=args.seed)
    run_iid(problems[:1], sampler, cfg)  # warm-up (stop tables, RoPE table, allocator)
    totals: dict[str, dict] = {"iid": {}, "tree": {}}
    for r in range(args.repeats):
        for name, fn in (("iid", run_iid), ("tree", run_tree)) if r % 2 == 0 else \
                (("tree", run_tree), ("iid", run_iid)):
            for k, v in fn(problems, sampler, cfg).items():
                totals[name][k] = totals[name].get(k, 0) + v
    iid, tree = totals["iid"], totals["tree"]
    print(f"{args.problems} prompts x w={args.width}, L={args.segment_len}, d={args.max_depth}, "
          f"b={args.branch}, {args.repeats} alternating repeats; tree: {tree['calls']} sampler "
          f"calls, {tree['fallbacks']} fallbacks")
    for name, t in totals.items():
        print(f"  {name:5s}: {t['trajectories'] / t['seconds']:6.1f} traj/s, {t['seconds']:6.1f}s, "
              f"{t['tokens_generated']} tokens sampled, {t['forward_tokens']} forward tokens, "
              f"{t['trajectory_tokens'] / t['trajectories']:.1f} tokens/traj, "
              f"accuracy {t['correct'] / t['trajectories']:.3f}")
    print(f"tree / iid: trajectories per second x{tree['trajectories'] / tree['seconds'] / (iid['trajectories'] / iid['seconds']):.2f}, "
          f"tokens sampled x{tree['tokens_generated'] / iid['tokens_generated']:.2f}, "
          f"forward tokens x{tree['forward_tokens'] / iid['forward_tokens']:.2f}")
    print(f"with a cross-call prefix cache (prompt once + sampled tokens): forward tokens "
          f"x{tree['cached_forward'] / iid['cached_forward']:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
