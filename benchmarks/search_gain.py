"""Does the search select better trajectories than the policy samples? (the MCTS method's premise)

On the same training problems, side by side in one run: the trajectory `mcts.search` selects,
one policy sample (mean over --samples i.i.d. samples), best-of-N by dense reward at the same
generated tokens as a tree, and the best answer already in each tree (an upper bound). Dense
reward (training's) and exact success (the sparse 0/1 eval reward).

    python benchmarks/search_gain.py                         # the start model, train.py's search
    python benchmarks/search_gain.py --model runs/mcts-seed0 # a trained run (its latest checkpoint)
    python benchmarks/search_gain.py --iterations 4          # M per worker

Targets at train.py's default search on the start model: selected exact success >= 3x a
sample's, selected dense reward >= a sample's + 0.5, at <= 1.3x the generated tokens per tree of
the old search (M = 64 selections per tree in all: ~910 tokens). Tune knobs on other problems
than the benchmark's (--offset 96 --problems 384), then check on the first 96.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import countdown
import mcts
import tiny
import train
from sampler import TorchSampler
from value_head import load_policy

TRAIN = train.Args()  # the search knobs default to train.py's (the embedded CPU run)


@dataclass
class Args:
    """Search knobs default to train.py's (embedded CPU run)."""

    model: str = "tiny"  # "tiny", a local checkpoint dir, or a run dir (its latest checkpoint)
    problems: int = 48  # training problems (the first of train.py's seeded data order)
    offset: int = 0  # skip this many of them first (tune on other problems than the benchmark's)
    iterations: int = TRAIN.mcts_iterations  # M per worker
    workers: int = TRAIN.mcts_workers
    k: int = TRAIN.mcts_k
    c_puct: float = TRAIN.c_puct  # pUCT exploration (blog: 0.5; train.py's default: 2.0)
    virtual_value: float = TRAIN.mcts_virtual_value  # 0: the blog table's visits-only rule
    select: str = TRAIN.mcts_select  # greedy selection: visits (blog), q, best_reward
    samples: int = 16  # i.i.d. policy samples per problem for the "one sample" row
    temperature: float = TRAIN.temperature
    max_step_tokens: int = TRAIN.max_step_tokens
    max_new_tokens: int = TRAIN.max_new_tokens
    prompts_per_call: int = TRAIN.prompts_per_call  # trees searched together
    threads: int = 2
    seed: int = 0
    out: str = ""  # write the summary as JSON here


def training_problems(n: int, seed: int, offset: int = 0) -> list[countdown.Problem]:
    """n problems of train.py's seeded data order from position offset (0: generator 0's first
    work items)."""
    train, _ = countdown.make_splits()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[i] for i in order[offset:offset + n]]


def measure(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    policy, tokenizer = load_policy(tiny.resolve_model(args.model))
    sampler = TorchSampler(policy, tokenizer, seed=args.seed)
    problems = training_problems(args.problems, args.seed, args.offset)
    cfg = mcts.MCTSConfig(workers=args.workers, iterations=args.iterations, k=args.k,
                          c_puct=args.c_puct, virtual_value=args.virtual_value,
                          select=args.select, temperature=args.temperature, max_step_tokens=args.max_step_tokens,
                          max_total_tokens=args.max_new_tokens)

    start = time.perf_counter()
    results = []
    for i in range(0, len(problems), args.prompts_per_call):
        results += mcts.search(problems[i:i + args.prompts_per_call], sampler, cfg)
    search_s = time.perf_counter() - start
    tree_tokens = np.array([r.stats["tokens_generated"] for r in results], dtype=float)

    # i.i.d. samples: enough for the "one sample" mean and for best-of-N at a tree's tokens
    prompts = [countdown.prompt_ids(p, tokenizer) for p in problems]
    first = sampler.generate(prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, stop=(countdown.ANSWER_CLOSE,))
    sample_tokens = np.mean([len(c.tokens) for group in first for c in group])
    n_equal = max(1, round(tree_tokens.mean() / sample_tokens))
    extra = n_equal - args.samples
    more = (sampler.generate(prompts, n=extra, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, stop=(countdown.ANSWER_CLOSE,))
            if extra > 0 else [[] for _ in problems])

    def rewards(texts_by_problem, fn):
        return [[fn(t, p) for t in texts] for p, texts in zip(problems, texts_by_problem)]

    sample_texts = [[c.text for c in g] for g in first]
    pool = [[c.text for c in g + m] for g, m in zip(first, more)]
    dense_s = rewards(sample_texts, countdown.dense_reward)
    sparse_s = rewards(sample_texts, countdown.sparse_reward)
    dense_pool = rewards(pool, countdown.dense_reward)
    bon = [int(np.argmax(d[:n_equal])) for d in dense_pool]
    best_in_tree = [max((n.reward for n in mcts.terminals(r.root)), default=-1.0)
                    for r in results]
    row = {
        "model": args.model, "problems": len(problems), "search": asdict(cfg),
        "search_seconds": search_s,
        "tokens_per_tree": float(tree_tokens.mean()),
        "tokens_per_sample": float(sample_tokens),
        "bon_n_equal_tokens": n_equal,
        "selected_dense": float(np.mean([r.reward for r in results])),
        "selected_sparse": float(np.mean([countdown.sparse_reward(r.text, p)
                                          for r, p in zip(results, problems)])),
        "sample_dense": float(np.mean(dense_s)),
        "sample_sparse": float(np.mean(sparse_s)),
        "bon_dense": float(np.mean([d[b] for d, b in zip(dense_pool, bon)])),
        "bon_sparse": float(np.mean([countdown.sparse_reward(t[b], p)
                                     for t, b, p in zip(pool, bon, problems)])),
        "best_in_tree_dense": float(np.mean(best_in_tree)),
        "exact_in_tree": float(np.mean([any(n.reward == 1.0 for n in mcts.terminals(r.root))
                                        for r in results])),  # an upper bound on selected exact
        "greedy_depth": float(np.mean([r.stats["depth"] for r in results])),
        "from_rollout": float(np.mean([r.stats["from_rollout"] for r in results])),
        "terminal_backups_per_tree": float(np.mean([r.stats["terminal_backups"]
                                                    for r in results])),
        "expansions_per_tree": float(np.mean([r.stats["expansions"] for r in results])),
    }
    row["search_gain_dense"] = row["selected_dense"] - row["sample_dense"]
    row["success_ratio"] = row["selected_sparse"] / max(row["sample_sparse"], 1e-9)
    return row


def main(args: Args) -> None:
    row = measure(args)
    print(f"{row['model']}: {row['problems']} training problems, M={args.iterations} per worker, "
          f"{args.workers} workers, K={args.k} ({row['search_seconds']:.0f} s of search)")
    print(f"{'':34} {'dense':>7} {'exact':>7} {'tokens':>8}")
    print(f"{'one policy sample (mean)':34} {row['sample_dense']:>+7.2f} "
          f"{row['sample_sparse']:>7.1%} {row['tokens_per_sample']:>8.0f}")
    print(f"{'best-of-' + str(row['bon_n_equal_tokens']) + ' (equal tokens, dense)':34} "
          f"{row['bon_dense']:>+7.2f} {row['bon_sparse']:>7.1%} "
          f"{row['bon_n_equal_tokens'] * row['tokens_per_sample']:>8.0f}")
    print(f"{'MCTS-selected trajectory':34} {row['selected_dense']:>+7.2f} "
          f"{row['selected_sparse']:>7.1%} {row['tokens_per_tree']:>8.0f}")
    print(f"{'best answer already in the tree':34} {row['best_in_tree_dense']:>+7.2f} "
          f"{row['exact_in_tree']:>7.1%}")
    print(f"search gain (selected - sample): dense {row['search_gain_dense']:+.2f} (target >= +0.5), "
          f"exact success x{row['success_ratio']:.1f} (target >= 3x); greedy depth "
          f"{row['greedy_depth']:.2f}, answers from rollouts {row['from_rollout']:.0%}, terminal "
          f"backups per tree {row['terminal_backups_per_tree']:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
