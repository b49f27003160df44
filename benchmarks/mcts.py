"""How much of an MCTS search is spent outside the model, and what prefix reuse saves.

Ratios from one run on the tiny model (targets: <= 10% of the wall time outside the sampler's
calls; >= 30% of forward tokens saved by encoding each leaf's context once for its K samples;
the sampler also encodes the prefix that a round's contexts of one tree share only once).

    python benchmarks/mcts.py [--model tiny] [--problems 4] [--iterations 100]
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
import mcts
import tiny
from sampler import TorchSampler
from value_head import load_policy


@dataclass
class Args:
    """Benchmark knobs; search defaults are MCTSConfig's (the blog's table) except M."""

    model: str = "tiny"  # "tiny" (built and cached on first use) or a local dir
    problems: int = 4  # trees searched together in the same batched sampler calls
    iterations: int = 100  # M per tree (blog: 100)
    workers: int = 16  # parallel workers per tree
    virtual_value: float = 0.0  # MCTSConfig.virtual_value (0: blog; -1: classic virtual loss)
    threads: int = 2  # torch threads (the CPU box has 2 cores)
    seed: int = 0


class TimedSampler:
    """Wraps a sampler and adds up the wall time spent inside generate (the model's forwards)."""

    def __init__(self, sampler):
        self.sampler, self.tokenizer, self.seconds = sampler, sampler.tokenizer, 0.0

    @property
    def forward_tokens(self) -> int:
        return self.sampler.forward_tokens

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.sampler.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    policy, tokenizer = load_policy(tiny.resolve_model(args.model))
    sampler = TimedSampler(TorchSampler(policy, tokenizer, seed=args.seed))
    problems = countdown.make_splits(args.seed, n_train=0, n_test=args.problems)[1]
    cfg = mcts.MCTSConfig(workers=args.workers, iterations=args.iterations,
                          virtual_value=args.virtual_value)
    start = time.perf_counter()
    results = mcts.search(problems, sampler, cfg)
    total = time.perf_counter() - start

    fanout = sum(r.stats["forward_tokens"] for r in results)
    reencode = sum(r.stats["forward_tokens_reencode"] for r in results)
    generated = sum(r.stats["tokens_generated"] for r in results)
    stats = results[0].stats
    print(f"{args.problems} trees x M={args.iterations}, {args.workers} workers, K={cfg.k}: "
          f"{total:.1f}s, {stats['sampler_calls']} sampler calls, {generated} tokens generated "
          f"({generated / total:.0f}/s), {sum(r.stats['nodes'] for r in results)} nodes, "
          f"{sum(r.stats['collisions'] for r in results)} collisions in "
          f"{args.problems * args.iterations} selections")
    print(f"time outside the sampler's calls: {1 - sampler.seconds / total:.1%} "
          f"(target <= 10%)")
    counted = stats["sampler_forward_tokens"]
    print(f"forward tokens: {reencode} re-encoding each context per sample, {fanout} with each "
          f"context encoded once for its K samples ({1 - fanout / reencode:.1%} saved, target "
          f">= 30%),\n  {counted} counted by the sampler, which also encodes a prefix shared "
          f"by contexts once ({1 - counted / reencode:.1%} saved)")
    for r in results[:2]:
        print(f"  depth {r.stats['depth']}, reward {r.reward:+.2f}: {r.text!r}")


if __name__ == "__main__":
    main(tyro.cli(Args))
