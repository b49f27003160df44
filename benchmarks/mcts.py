"""How much of an MCTS search is spent outside the model, and what prefix reuse saves.

Ratios from one run on the tiny model (targets: <= 10% of the wall time outside the sampler's
calls; >= 30% of forward tokens saved by encoding each leaf's context once for its K samples;
the sampler also encodes the prefix that a round's contexts of one tree share only once).

    python benchmarks/mcts.py [--model tiny] [--problems 4] [--iterations 12]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting import CountingSampler

import countdown
import mcts
import tiny
from sampler import TorchSampler
from value_head import load_policy


@dataclass
class Args:
    """Benchmark knobs; search defaults are MCTSConfig's (the blog's table) except M."""

    model: str = "tiny"  # "tiny" (built and cached on first use) or a local dir
    problems: int = 4  # trees searched together in the same batched sampler calls
    iterations: int = 12  # M per worker (blog: 100; train.py's CPU default)
    workers: int = 16  # parallel workers per tree
    virtual_value: float = 0.0  # MCTSConfig.virtual_value (0: blog; -1: classic virtual loss)
    threads: int = 2  # torch threads (the CPU box has 2 cores)
    seed: int = 0


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    policy, tokenizer = load_policy(tiny.resolve_model(args.model))
    sampler = CountingSampler(TorchSampler(policy, tokenizer, seed=args.seed))
    problems = countdown.make_splits(args.seed, n_train=0, n_test=args.problems)[1]
    cfg = mcts.MCTSConfig(workers=args.workers, iterations=args.iterations,
                          virtual_value=args.virtual_value)
    start = time.perf_counter()
    results = mcts.search(problems, sampler, cfg)
    total = time.perf_counter() - start

    generated = sum(r.stats["tokens_generated"] for r in results)
    print(f"{args.problems} trees x M={args.iterations} per worker, {args.workers} workers, "
          f"K={cfg.k}: {total:.1f}s, {sampler.calls} sampler calls, {generated} tokens generated "
          f"({generated / total:.0f}/s), {sum(r.stats['nodes'] for r in results)} nodes, "
          f"{sum(r.stats['collisions'] for r in results)} collisions in "
          f"{sum(r.stats['selections'] for r in results)} selections")
    print(f"time outside the sampler's calls: {1 - sampler.seconds / total:.1%} "
          f"(target <= 10%)")
    reencode, fanout = sampler.reencode_tokens, sampler.fanout_tokens
    print(f"forward tokens: {reencode} re-encoding each context per sample, {fanout} with each "
          f"context encoded once for its K samples ({1 - fanout / reencode:.1%} saved, target "
          f">= 30%),\n  {sampler.forward_tokens} counted by the sampler, which also encodes a "
          f"prefix shared by contexts once ({1 - sampler.forward_tokens / reencode:.1%} saved)")
    for r in results[:2]:
        print(f"  depth {r.stats['depth']}, reward {r.reward:+.2f}: {r.text!r}")


if __name__ == "__main__":
    main(tyro.cli(Args))
