"""EPTree vs i.i.d. sampling at an equal generated-token budget: how diverse are the answers?

TreeRL's claim (its Fig. 4): forking from high-entropy tokens yields more distinct correct
responses than i.i.d. multi-chain sampling for the same inference tokens (a branch reuses its
prefix instead of generating it again). One run, side by side on the same problems: EPTree with
the paper's (M, N, L, T) first; then i.i.d. samples per prompt, taken in order until they reach
the tree's generated tokens per prompt.

    python benchmarks/treerl.py --problems 32
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
import treerl
from sampler import TorchSampler
from value_head import load_policy


@dataclass
class Args:
    """Benchmark knobs; the tree defaults are the paper's (M, N, L, T) = (6, 2, 1, 2)."""

    model: str = "tiny"  # "tiny" (built and cached on first use) or a local dir
    problems: int = 32  # test problems, all searched in the same batched sampler calls
    M: int = 6  # initial i.i.d. responses per prompt
    N: int = 2  # forking points per tree per iteration
    L: int = 1  # iterations
    T: int = 2  # branches per forking point
    max_new_tokens: int = 128
    temperature: float = 1.0
    iid_pool: int = 64  # i.i.d. samples drawn per prompt; the budget takes a prefix of them
    threads: int = 2  # torch threads (the CPU box has 2 cores)
    seed: int = 0


def diversity(texts: list[str], problem: countdown.Problem) -> dict:
    """Distinct answers (parsed expression, spaces removed) and distinct correct ones."""
    answers = {a.replace(" ", "") for a in map(countdown.parse_answer, texts) if a is not None}
    correct = {a for a in answers
               if countdown.sparse_reward(f"{countdown.ANSWER_OPEN}{a}{countdown.ANSWER_CLOSE}",
                                          problem) == 1.0}
    return {"distinct_answers": len(answers), "distinct_correct": len(correct),
            "solved": float(bool(correct)),
            "correct_rate": sum(countdown.sparse_reward(t, problem) for t in texts) / len(texts)}


def mean_row(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy, tok = load_policy(tiny.resolve_model(args.model))
    policy.eval()
    _, test = countdown.make_splits(seed=0)
    problems = test[:args.problems]
    cfg = treerl.TreeRLConfig(M=args.M, N=args.N, L=args.L, T=args.T,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    sampler = TorchSampler(policy, tok, seed=args.seed)
    start = time.perf_counter()
    rows = treerl.treerl_rollouts(problems, sampler, cfg)
    tree_seconds = time.perf_counter() - start
    budget = rows[0]["stats"]["tokens_generated"] / len(problems)  # generated tokens per prompt
    tree = []
    for g, problem in enumerate(problems):
        texts = [r["text"] for r in rows if r["group"] == g]
        tree.append({"trajectories": len(texts), "tokens": budget, **diversity(texts, problem)})

    sampler = TorchSampler(policy, tok, seed=args.seed + 1)
    start = time.perf_counter()
    pool = sampler.generate([countdown.prompt_ids(p, tok) for p in problems], n=args.iid_pool,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            stop=(countdown.ANSWER_CLOSE,))
    iid_seconds = time.perf_counter() - start
    iid, short = [], 0
    for problem, samples in zip(problems, pool):
        taken, used = [], 0
        for c in samples:  # in sampling order until the tree's per-prompt budget is reached
            if used >= budget:
                break
            taken.append(c.text)
            used += len(c.tokens)
        short += used < budget
        iid.append({"trajectories": len(taken), "tokens": used, **diversity(taken, problem)})

    print(f"{len(problems)} problems, model {args.model}, EPTree (M, N, L, T) = "
          f"({args.M}, {args.N}, {args.L}, {args.T}), temperature {args.temperature}, "
          f"max_new_tokens {args.max_new_tokens}; per prompt, mean over problems")
    print(f"budget: {budget:.0f} generated tokens per prompt (EPTree's own count); "
          f"EPTree {tree_seconds:.1f}s, i.i.d. pool of {args.iid_pool}/prompt {iid_seconds:.1f}s")
    if short:
        print(f"warning: {short} prompts ran out of the i.i.d. pool before the budget")
    a, b = mean_row(tree), mean_row(iid)
    print(f"{'':18s}{'EPTree':>10s}{'i.i.d.':>10s}{'ratio':>8s}")
    for key in ("trajectories", "tokens", "distinct_answers", "distinct_correct", "solved",
                "correct_rate"):
        ratio = a[key] / b[key] if b[key] else float("nan")
        print(f"{key:18s}{a[key]:10.2f}{b[key]:10.2f}{ratio:8.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
