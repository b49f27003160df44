"""Eval: the blog's mean@16, and test-time search compared at an equal generated-token budget.

mean@16 (blog, "Results"): 16 generations per eval prompt, each graded with the sparse 0/1
reward, averaged. The search harness answers the readers' question the blog leaves open: at the
same number of generated tokens, does searching beat sampling more?

Interpretation choices:
- ci95 = 1.96 x sample std of the per-problem means / sqrt(problems): the samples of one
  problem are correlated, so the problem is the unit. `--baseline` evaluates a second checkpoint
  on the same problems with the same seed and reports the paired difference and its CI (much
  tighter than two separate CIs: easy problems are easy for both).
- A token budget T counts only the tokens the sampler returned. `none` = one sample capped at
  T; `bon` = samples while the budget lasts, the answer chosen without ground truth (majority
  vote over the answers' exact values, ties by the value head; `--bon-select value`); `mcts` =
  search with the value head at terminal nodes and `max_tree_tokens = T`, so search + final
  rollout never exceed T (the completion cap is T/2, at most --max-new-tokens).
- `--checkpoint` takes a saved policy, a train.py run directory (its latest checkpoint), `tiny`
  or a hub id; `--threads 1` when several evals share the cores (oversubscribed OpenMP threads
  slowed two concurrent evals ~5x).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
from tqdm import tqdm

from countdown import (
    ANSWER_CLOSE,
    Problem,
    evaluate_expression,
    is_well_formatted,
    make_splits,
    parse_answer,
    prompt_ids,
    sparse_reward,
)
from flags import check_flags
from mcts import MCTSConfig, search_tree_to_dict
from mcts import search as mcts_search

SEARCH_METHODS = ("none", "bon", "mcts")
BON_SELECT = ("vote", "value")


def ci95_half_width(per_problem: Sequence[float]) -> float:
    """1.96 * standard error with the PROBLEM as the unit (sample std, ddof=1): the n samples of
    one problem are correlated, so treating all P*n samples as independent would understate it."""
    m = np.asarray(per_problem, dtype=np.float64)
    if len(m) < 2:
        return float("nan")
    return float(1.96 * m.std(ddof=1) / math.sqrt(len(m)))


def evaluate(sampler, problems: Sequence[Problem], n: int = 16, temperature: float = 1.0,
             max_new_tokens: int = 128, batch_size: int = 16, progress: bool = True) -> dict:
    """mean@n over `problems` (sparse 0/1 reward), with a per-problem 95% CI, format rate,
    mean completion length in tokens and pass@n; `batch_size` problems per generate call."""
    if n < 1 or not problems:
        raise ValueError(f"evaluate needs n >= 1 and at least one problem (got n={n}, "
                         f"{len(problems)} problems)")
    per_problem, formatted, lengths = [], [], []
    bar = tqdm(total=len(problems), desc=f"mean@{n}", unit="problem", disable=not progress)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        # full completions: the sample goes on through </step>s and ends at </answer> or EOS
        outs = sampler.generate([prompt_ids(p, sampler.tokenizer) for p in chunk], n=n,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                stop=(ANSWER_CLOSE,))
        for problem, completions in zip(chunk, outs, strict=True):
            per_problem.append(np.mean([sparse_reward(c.text, problem) for c in completions]))
            formatted += [is_well_formatted(c.text) for c in completions]
            lengths += [len(c.tokens) for c in completions]
        bar.update(len(chunk))
    bar.close()
    per_problem = np.asarray(per_problem)
    return {
        "mean_at_n": float(per_problem.mean()),  # equal n per problem: = mean over all samples
        "ci95": ci95_half_width(per_problem),
        "format_rate": float(np.mean(formatted)),
        "mean_len": float(np.mean(lengths)),
        "pass_at_n": float(np.mean(per_problem > 0)),
        "per_problem": per_problem.tolist(),  # mean@n of each problem, for paired comparisons
        "n_problems": len(problems),
        "n_samples": n,
    }


def paired_difference(baseline: Sequence[float], model: Sequence[float]) -> dict:
    """model - baseline on the same problems: mean and 95% CI of the per-problem differences.
    Pairing removes the problem-to-problem spread (easy problems are easy for both), so the CI
    is much tighter than the two separate CIs suggest."""
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same problems ({a.shape} vs {b.shape})")
    return {"difference": float((b - a).mean()), "difference_ci95": ci95_half_width(b - a)}


# ---------------------------------------------------------------------------------------------
# Test-time search at an equal generated-token budget per problem (none / best-of-N / MCTS).
# Budgets count the tokens the sampler returns (stop string / EOS included), nothing else.


def sample_within_budget(sampler, prompts: list[list[int]], budget: int, max_samples: int,
                         max_new_tokens: int, temperature: float, min_sample_tokens: int = 16
                         ) -> tuple[list[list], list[int]]:
    """Per prompt, draw samples while its budget lasts: a sample may use at most the tokens left
    (after the first round rounded down to a power of two: few distinct calls), so the sum never
    exceeds `budget`. After the first sample, none shorter than `min_sample_tokens` (no room for
    an answer). Returns (completions per prompt, tokens used per prompt)."""
    samples: list[list] = [[] for _ in prompts]
    used = [0] * len(prompts)
    while True:
        groups: dict[tuple[int, int], list[int]] = {}  # (samples, max tokens each) -> prompts
        for i in range(len(prompts)):
            left, room = budget - used[i], max_samples - len(samples[i])
            if room < 1 or left < (min_sample_tokens if samples[i] else 1):
                continue
            # all prompts start with the same budget: one call; later rounds round down
            cap = min(max_new_tokens, 1 << (left.bit_length() - 1) if samples[i] else left)
            groups.setdefault((min(room, left // cap), cap), []).append(i)
        if not groups:
            return samples, used
        for (n, cap), idx in groups.items():
            outs = sampler.generate([prompts[i] for i in idx], n=n, max_new_tokens=cap,
                                    temperature=temperature, stop=(ANSWER_CLOSE,),
                                    want_values=True)
            for i, completions in zip(idx, outs, strict=True):
                samples[i] += completions
                # max(1, .): a (broken) sampler returning empty samples cannot loop forever
                used[i] += sum(max(1, len(c.tokens)) for c in completions)


def answer_value(text: str) -> Fraction | None:
    """Exact value of the completion's answer expression (None without a parseable answer)."""
    answer = parse_answer(text)
    result = None if answer is None else evaluate_expression(answer)
    return None if result is None else result[0]


def select_answer(completions: list, select: str = "vote"):
    """Best-of-N WITHOUT ground truth. "vote": majority vote over the answers' exact values, ties
    (and the case of no parseable answer) broken by the value head's V at the sample's end;
    "value": the value head alone. Neither looks at the target or at the given numbers."""
    if select not in BON_SELECT:
        raise ValueError(f"bon selection must be one of {BON_SELECT}, got {select!r}")

    def v(c) -> float:
        return c.value if c.value is not None else -math.inf

    values = [answer_value(c.text) for c in completions]
    votes = Counter(x for x in values if x is not None)
    if select == "value" or not votes:
        return max(completions, key=v)
    return max((c for c, x in zip(completions, values) if x is not None),
               key=lambda c: (votes[answer_value(c.text)], v(c)))


def mcts_budget_config(budget: int, max_new_tokens: int, k: int, workers: int,
                       step_tokens: int) -> MCTSConfig | None:
    """An MCTS config that cannot generate more than `budget` tokens: `max_tree_tokens = budget`
    (mcts.py stops a tree's search when a worst-case expansion plus the final rollout would not
    fit). Half the budget (at most max_new_tokens) is the completion cap; iterations = budget is
    only an upper bound (an expansion costs >= 1 token). None if no expansion fits."""
    max_total = min(max_new_tokens, budget // 2)
    if budget < k * step_tokens + max_total:
        return None
    # selection by visits and the value head at terminals: no ground truth at test time
    return MCTSConfig(workers=workers, iterations=budget, k=k, max_step_tokens=step_tokens,
                      max_total_tokens=max_total, select="visits", terminal_value="value_head",
                      max_tree_tokens=budget)


def answer_with_search(sampler, problems: Sequence[Problem], method: str, budget: int, *,
                       max_new_tokens: int = 128, temperature: float = 1.0,
                       bon_select: str = "vote", mcts_cfg: MCTSConfig | None = None
                       ) -> tuple[list[str], list[int], list]:
    """One answer per problem within `budget` generated tokens: "none" (one sample), "bon"
    (samples while the budget lasts, `select_answer`) or "mcts" (`mcts.search`).
    Returns (answer texts, tokens used per problem, mcts.SearchResults (mcts only))."""
    if method == "mcts":
        if mcts_cfg is None:
            raise ValueError(f"no MCTS config fits a budget of {budget} tokens")
        results = mcts_search(list(problems), sampler, mcts_cfg)
        return ([r.text for r in results], [r.stats["tokens_generated"] for r in results],
                results)
    if method not in ("none", "bon"):
        raise ValueError(f"search must be one of {SEARCH_METHODS}, got {method!r}")
    prompts = [prompt_ids(p, sampler.tokenizer) for p in problems]
    samples, used = sample_within_budget(sampler, prompts, budget,
                                         max_samples=1 if method == "none" else budget,
                                         max_new_tokens=max_new_tokens, temperature=temperature)
    if method == "none":
        return [s[0].text for s in samples], used, []
    return [select_answer(s, bon_select).text for s in samples], used, []


def search_eval(sampler, problems: Sequence[Problem], methods: Sequence[str],
                budgets: Sequence[int], *, max_new_tokens: int = 128, temperature: float = 1.0,
                bon_select: str = "vote", mcts_k: int = 4, mcts_workers: int = 1,
                mcts_step_tokens: int = 16, batch_size: int = 64, progress: bool = True,
                dump_trees: Path | None = None, dump_count: int = 4) -> list[dict]:
    """Accuracy (sparse reward of the chosen answer) per (method, budget): the equal-compute
    comparison. The CI unit is the problem (one 0/1 answer each)."""
    rows = []
    for method in methods:
        for budget in budgets:
            cfg = mcts_budget_config(budget, max_new_tokens, mcts_k, mcts_workers,
                                     mcts_step_tokens) if method == "mcts" else None
            if method == "mcts" and cfg is None:
                print(f"mcts: no expansion fits a budget of {budget} tokens, skipped")
                continue
            rewards, used, selections = [], [], []
            for start in tqdm(range(0, len(problems), batch_size), disable=not progress,
                              desc=f"{method} @ {budget} tokens"):
                chunk = problems[start:start + batch_size]
                texts, tokens, searches = answer_with_search(
                    sampler, chunk, method, budget, max_new_tokens=max_new_tokens,
                    temperature=temperature, bon_select=bon_select, mcts_cfg=cfg)
                rewards += [sparse_reward(t, p) for t, p in zip(texts, chunk, strict=True)]
                used += tokens
                selections += [r.stats["selections"] for r in searches]
                if dump_trees is not None and start < dump_count:
                    dump_search_trees(dump_trees, budget, start, chunk,
                                      [r.root for r in searches[:dump_count - start]])
            if max(used) > budget:  # cannot happen by construction; the comparison rests on it
                raise RuntimeError(f"{method} used {max(used)} > {budget} tokens")
            rows.append({"method": method, "budget_tokens": budget,
                         "accuracy": float(np.mean(rewards)), "ci95": ci95_half_width(rewards),
                         "mean_tokens_used": float(np.mean(used)), "max_tokens_used": max(used),
                         "n_problems": len(problems),
                         **({"mcts_selections": float(np.mean(selections))} if cfg else {})})
    return rows


def dump_search_trees(out_dir: Path, budget: int, first: int, problems: Sequence[Problem],
                      roots: list) -> None:
    """Search trees as JSON for `python plots.py tree <file>`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (problem, root) in enumerate(zip(problems, roots)):
        tree = {"problem": {"nums": list(problem.nums), "target": problem.target},
                "budget_tokens": budget, **search_tree_to_dict(root)}
        (out_dir / f"tree_b{budget}_{first + i:03d}.json").write_text(json.dumps(tree))


# ---------------------------------------------------------------------------------------------
# CLI


@dataclass
class Args:
    """python eval.py --checkpoint tiny [--limit 100] [--search none bon mcts --budget-tokens 64 128 256 512]"""

    checkpoint: str = "tiny"  # a saved PolicyWithValue directory, "tiny", or a hub id
    limit: int | None = None  # evaluate the first `limit` test problems (default: all 820)
    n: int = 16  # samples per problem: mean@16 (blog, "Results")
    temperature: float = 1.0  # sampling temperature (the author's eval used 0.2)
    max_new_tokens: int = 128  # cap on one completion
    batch_size: int = 16  # problems per sampler call (each with n samples)
    backend: str = "auto"  # auto (by model size: sampler.choose_backend), torch or vllm
    seed: int = 0  # sampler seed
    data_seed: int = 0  # countdown.make_splits seed: the test split
    out: Path = Path("summary.json")  # JSON summary (and, with --budget-tokens, a budget plot PNG)
    search: tuple[Literal["none", "bon", "mcts"], ...] = ("none",)  # with --budget-tokens
    budget_tokens: tuple[int, ...] = ()  # generated tokens per problem; empty: plain mean@n eval
    bon_select: Literal["vote", "value"] = "vote"  # best-of-N without ground truth: majority or value head
    mcts_k: int = 4  # completions per expanded leaf
    mcts_workers: int = 1  # selections per round (1: sequential search, best at small budgets)
    mcts_step_tokens: int = 16  # cap on one step (the tiny model's steps are ~7 tokens)
    dump_trees: Path | None = None  # write the first trees of each MCTS search here as JSON
    dump_count: int = 4  # how many trees per budget --dump-trees writes
    baseline: str | None = None  # also evaluate this checkpoint (same problems, same seed) and
    #                              report the paired difference checkpoint - baseline with its CI
    threads: int | None = None  # torch threads (default: torch's, one per core); 1 when several
    #                             evals or runs share the cores (oversubscribed, each slows ~5x)


FLAG_RULES = {">= 1": ("limit", "n", "max_new_tokens", "batch_size", "mcts_k", "mcts_workers",
                      "mcts_step_tokens", "threads", "budget_tokens"),
              "finite >= 0": ("temperature",)}


def shipped_start_eval(args: Args, n_problems: int) -> dict | None:
    """`--baseline tiny`: the shipped start model's own eval (tiny_model/start_eval_t*.json) when
    it was made with these settings, so the start is not sampled again; else None."""
    import tiny

    start = tiny.start_eval(args.temperature) if args.baseline == "tiny" else None
    if start is None or start.get("checkpoint_checksum") != tiny.SHIPPED_CHECKSUM:
        return None
    settings = {"max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "data_seed": args.data_seed, "n_samples": args.n, "n_problems": n_problems}
    return start if all(start.get(k) == v for k, v in settings.items()) else None


def main(args: Args, show: bool = True) -> dict:
    """Evaluate, write args.out; with show, print the summary (train.py's final eval prints its
    own line)."""
    check_flags("eval.py", vars(args), FLAG_RULES)
    try:  # fail now, not after the eval
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create its directory ({e.strerror})") from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    import tiny  # model side imported here: the eval math above needs none
    from sampler import choose_backend, make_sampler
    from value_head import load_policy, machine, model_checksum

    checkpoint = tiny.resolve_model(args.checkpoint)  # "tiny" -> its cached directory
    policy, tokenizer = load_policy(checkpoint)
    args.backend = choose_backend(args.backend, policy)
    sampler = make_sampler(args.backend, policy, tokenizer, seed=args.seed)
    _, test = make_splits(args.data_seed)
    problems = test[:args.limit] if args.limit else test
    summary = {"checkpoint": args.checkpoint, "temperature": args.temperature,
               "max_new_tokens": args.max_new_tokens, "seed": args.seed,
               "data_seed": args.data_seed,
               "checkpoint_checksum": model_checksum(checkpoint),
               "machine": machine()}
    if args.budget_tokens:
        summary["bon_select"] = args.bon_select
        summary["search"] = search_eval(
            sampler, problems, args.search, args.budget_tokens,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            bon_select=args.bon_select, mcts_k=args.mcts_k, mcts_workers=args.mcts_workers,
            mcts_step_tokens=args.mcts_step_tokens, batch_size=args.batch_size,
            dump_trees=args.dump_trees, dump_count=args.dump_count)
    else:
        summary.update(evaluate(sampler, problems, n=args.n, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
        if args.baseline:
            base = shipped_start_eval(args, len(problems))
            if base is None:
                base_policy, base_tok = load_policy(tiny.resolve_model(args.baseline))
                base = evaluate(make_sampler(args.backend, base_policy, base_tok, seed=args.seed),
                                problems, n=args.n, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            summary["baseline"] = {"checkpoint": args.baseline, **base}
            summary.update(paired_difference(base["per_problem"], summary["per_problem"]))
    args.out.write_text(json.dumps(summary, indent=2))
    if not show:
        return summary
    short = {k: v for k, v in summary.items() if k != "per_problem"}  # the file keeps them
    if "baseline" in short:
        short["baseline"] = {k: v for k, v in short["baseline"].items() if k != "per_problem"}
    print(json.dumps(short, indent=2))
    if args.budget_tokens:
        import plots

        print(plots.save(plots.budget_figure(summary), args.out.with_suffix(".png")))
    return summary


def final_eval(run_dir: Path, baseline: str | None, backend: str = "auto") -> dict:
    """The end of a train.py run: mean@16 of its last checkpoint on all 820 test problems at
    T = 1.0 into <run_dir>/eval_t1.json, and with `baseline` ("tiny": its shipped eval, not
    sampled again) the paired gain; one line printed."""
    summary = main(Args(checkpoint=str(run_dir), baseline=baseline, backend=backend,
                        out=Path(run_dir) / "eval_t1.json"), show=False)
    line = (f"mean@16 on all {summary['n_problems']} test problems (T = 1.0): "
            f"{summary['mean_at_n']:.2%} ± {summary['ci95']:.2%}")
    if baseline:
        line += (f"; start {summary['baseline']['mean_at_n']:.2%}, paired gain "
                 f"{100 * summary['difference']:+.2f} ± {100 * summary['difference_ci95']:.2f} points")
    print(line, f"({Path(run_dir) / 'eval_t1.json'})")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
