"""Eval: the blog's mean@16, and test-time search compared at an equal generated-token budget.

mean@16 (blog, "Results"): 16 generations per eval prompt, each graded with the sparse 0/1
reward, averaged. The search harness answers the readers' question the blog leaves open: at the
same number of generated tokens, does searching beat sampling more?
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from countdown import ANSWER_CLOSE, Problem, is_well_formatted, make_prompt, sparse_reward


def prompt_ids(problem: Problem, tokenizer) -> list[int]:
    """The prompt as token ids; the chat template already holds the special tokens."""
    return tokenizer(make_prompt(problem, tokenizer), add_special_tokens=False)["input_ids"]


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
        "n_problems": len(problems),
        "n_samples": n,
    }
