"""eval.py against a scripted fake sampler: every expected number is computed by hand."""

import math
from dataclasses import dataclass

import pytest

import eval as ev
import tiny
from countdown import ANSWER_CLOSE, Problem, solution_trace


@dataclass
class FakeCompletion:  # the fields of sampler.Completion that eval.py reads
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    value: float | None


class ScriptedSampler:
    """Stand-in for sampler.TorchSampler: the k-th sample of a problem's prompt is its script's
    k-th (text, value) (cycled), truncated to max_new_tokens like a real sampler."""

    def __init__(self, script: dict[Problem, list[tuple[str, float]]]):
        self.tokenizer = tiny.build_tokenizer()
        self.script = {tuple(ev.prompt_ids(p, self.tokenizer)): s for p, s in script.items()}
        self.drawn = {key: 0 for key in self.script}
        self.calls: list[dict] = []

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 stop=("</step>", ANSWER_CLOSE), want_values=False):
        self.calls.append({"n_prompts": len(prompts), "n": n, "max_new_tokens": max_new_tokens,
                               "stop": tuple(stop)})
        out = []
        for prompt in prompts:
            key = tuple(prompt)
            row = []
            for _ in range(n):
                text, value = self.script[key][self.drawn[key] % len(self.script[key])]
                self.drawn[key] += 1
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                cut = ids[:max_new_tokens]
                row.append(FakeCompletion(cut, [0.0] * len(cut), self.tokenizer.decode(cut),
                                          "answer" if len(cut) == len(ids) else "length",
                                          value if want_values else None))
            out.append(row)
        return out


def sum_problem(i: int) -> Problem:
    """A distinct problem (i < 26) whose target is the sum of its numbers, never the product."""
    a, b = i % 13 + 1, i // 13 + 2
    return Problem((a, b, 3, 5), a + b + 8)


def product_answer(p: Problem) -> str:
    """Well formatted, uses every number once, wrong (product != sum for these problems)."""
    return f"<answer>{'*'.join(map(str, p.nums))}</answer>"


def test_mean_at_16_exact_fraction_and_ci95_by_hand():
    problems = [sum_problem(i) for i in range(16)]
    script = {}
    for i, p in enumerate(problems):
        if i < 5:  # always right
            script[p] = [(solution_trace(p), 0.0)]
        elif i == 5:  # right in exactly 8 of 16 samples
            script[p] = [(solution_trace(p), 0.0), (product_answer(p), 0.0)]
        elif i < 11:  # always wrong but well formatted
            script[p] = [(product_answer(p), 0.0)]
        else:  # always wrong and not formatted
            script[p] = [("I give up", 0.0)]
    sampler = ScriptedSampler(script)
    result = ev.evaluate(sampler, problems, n=16, max_new_tokens=128, batch_size=5,
                         progress=False)

    # mean@16 = (5 problems * 16 + 8) right samples / (16 * 16) samples
    assert result["mean_at_n"] == pytest.approx(88 / 256)
    # per-problem means: five 1.0, one 0.5, ten 0.0; mean 5.5/16 = 0.34375.
    # sample std with ddof=1: squared deviations 5*(0.65625^2) + 0.15625^2 + 10*(0.34375^2)
    # = 2.1533203125 + 0.0244140625 + 1.181640625 = 3.359375; / 15; sqrt; / sqrt(16); * 1.96
    assert result["ci95"] == pytest.approx(1.96 * math.sqrt(3.359375 / 15) / 4)
    assert result["ci95"] == pytest.approx(0.2318888, abs=1e-6)
    assert result["pass_at_n"] == pytest.approx(6 / 16)
    assert result["format_rate"] == pytest.approx((16 - 5) / 16)  # only "I give up" fails
    tok = sampler.tokenizer
    n_tokens = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
    total = (sum(16 * n_tokens(solution_trace(p)) for p in problems[:5])
             + 8 * n_tokens(solution_trace(problems[5])) + 8 * n_tokens(product_answer(problems[5]))
             + sum(16 * n_tokens(product_answer(p)) for p in problems[6:11])
             + 5 * 16 * n_tokens("I give up"))
    assert result["mean_len"] == pytest.approx(total / 256)
    assert (result["n_problems"], result["n_samples"]) == (16, 16)
    # batched: 5 problems per call, 16 samples each, full completions (only </answer> stops)
    assert [c["n_prompts"] for c in sampler.calls] == [5, 5, 5, 1]
    assert all(c["n"] == 16 and c["stop"] == (ANSWER_CLOSE,) for c in sampler.calls)


def test_ci95_single_problem_is_undefined_and_bad_input_raises():
    assert math.isnan(ev.ci95_half_width([0.5]))
    with pytest.raises(ValueError, match="at least one problem"):
        ev.evaluate(ScriptedSampler({}), [], n=16, progress=False)
