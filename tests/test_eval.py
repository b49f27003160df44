"""eval.py against a scripted fake sampler: every expected number is computed by hand."""

import math
from dataclasses import dataclass

import pytest

import eval as ev
import tiny
from countdown import ANSWER_CLOSE, STEP_END, Problem, prompt_ids, solution_trace


@dataclass
class FakeCompletion:  # the fields of sampler.Completion that eval.py reads
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    value: float | None


class ScriptedSampler:
    """Stand-in for sampler.TorchSampler. The k-th sample for a problem is its script's k-th
    (text, value) among the texts that continue what the context already holds (MCTS paths),
    cut after the first stop string and at max_new_tokens like a real sampler. It counts the
    tokens it returns per problem: the budget tests' independent count."""

    def __init__(self, script: dict[Problem, list[tuple[str, float]]]):
        self.tokenizer = tiny.build_tokenizer()
        self.script = {tuple(prompt_ids(p, self.tokenizer)): s for p, s in script.items()}
        self.drawn = dict.fromkeys(self.script, 0)
        self.returned = dict.fromkeys(self.script, 0)
        self.calls: list[dict] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, context: list[int], max_new_tokens: int, stop, want_values: bool):
        key = next(k for k in self.script if tuple(context[:len(k)]) == k)
        done = self.tokenizer.decode(context[len(key):], skip_special_tokens=True)
        texts = [s for s in self.script[key] if s[0].startswith(done)] or self.script[key]
        text, value = texts[self.drawn[key] % len(texts)]
        self.drawn[key] += 1
        ids = self.encode(text.removeprefix(done))
        reason = "eos"
        for j in range(1, len(ids) + 1):
            decoded = self.tokenizer.decode(ids[:j], skip_special_tokens=True)
            if j > max_new_tokens:
                ids, reason = ids[:max_new_tokens], "length"
                break
            if any(decoded.endswith(s) for s in stop):
                ids, reason = ids[:j], "step" if decoded.endswith(STEP_END) else "answer"
                break
        self.returned[key] += len(ids)
        return FakeCompletion(ids, [-0.1] * len(ids), self.tokenizer.decode(ids), reason,
                              value if want_values else None)

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 stop=(STEP_END, ANSWER_CLOSE), want_values=False):
        self.calls.append({"n_prompts": len(prompts), "n": n, "max_new_tokens": max_new_tokens,
                           "stop": tuple(stop)})
        return [[self.sample(p, max_new_tokens, stop, want_values) for _ in range(n)]
                for p in prompts]


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
    assert result["per_problem"] == [1.0] * 5 + [0.5] + [0.0] * 10
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


def steps_trace(p: Problem) -> str:
    """A 3-step completion (sum, left to right) whose answer is right: MCTS can expand it."""
    a, b, c, d = p.nums
    return (f"{a}+{b}={a + b}</step>{a + b}+{c}={a + b + c}</step>{a + b + c}+{d}={p.target}"
            f"</step><answer>{a}+{b}+{c}+{d}</answer>")


def budget_script(problems):
    """Samples of various lengths (14 to ~40 tokens), right and wrong, with values."""
    return {p: [(steps_trace(p), 0.5), (product_answer(p), 0.2),
                ("1+1=2</step>2*2=4</step>" + product_answer(p), -0.3)] for p in problems}


@pytest.mark.parametrize("method", ["none", "bon", "mcts"])
@pytest.mark.parametrize("budget", [20, 64, 100, 128, 256, 512])
def test_budget_harness_never_exceeds_the_budget(method, budget):
    problems = [sum_problem(i) for i in range(6)]
    sampler = ScriptedSampler(budget_script(problems))
    cfg = ev.mcts_budget_config(budget, 128, k=2, workers=2, step_tokens=16)
    if method == "mcts" and cfg is None:
        # no expansion (2 * 16 tokens) fits next to the completion cap (half the budget)
        assert budget < 2 * (2 * 16)
        return
    texts, used, searches = ev.answer_with_search(sampler, problems, method, budget,
                                                  max_new_tokens=128, mcts_cfg=cfg)
    returned = [sampler.returned[tuple(prompt_ids(p, sampler.tokenizer))] for p in problems]
    assert used == returned  # the harness counts exactly the tokens the sampler returned
    assert max(returned) <= budget
    assert len(texts) == len(problems)
    if method == "none":  # one sample, cut at the budget
        first = sampler.encode(steps_trace(problems[0]))
        assert returned[0] == min(len(first), budget)
    if method == "bon" and budget >= 128:  # several samples were drawn: most of the budget used
        assert min(returned) > budget // 2
    if method == "mcts":
        assert len(searches) == len(problems)
        assert all(1 <= r.root.N <= r.stats["selections"] for r in searches)


def test_mcts_budget_config_worst_case_fits():
    # budget 512: completion cap min(128, 512 // 2) = 128; one expansion <= k * step = 64 tokens
    cfg = ev.mcts_budget_config(512, 128, k=4, workers=1, step_tokens=16)
    assert (cfg.max_tree_tokens, cfg.max_total_tokens, cfg.max_step_tokens) == (512, 128, 16)
    assert cfg.iterations >= 512  # only an upper bound: the token budget ends the search
    assert (cfg.select, cfg.terminal_value) == ("visits", "value_head")  # no ground truth
    assert ev.mcts_budget_config(128, 128, k=4, workers=1, step_tokens=16) is not None  # 64+64
    assert ev.mcts_budget_config(100, 128, k=4, workers=1, step_tokens=16) is None  # 50 + 64 > 100


def completion(text: str, value: float) -> FakeCompletion:
    return FakeCompletion([0] * len(text), [], text, "answer", value)


def test_bon_majority_vote_ignores_ground_truth():
    p = Problem((2, 3, 5, 1), 11)  # 2+3+5+1 = 11; the product 30 is wrong
    right = [completion("<answer>2+3+5+1</answer>", 0.9), completion("<answer>5+3+2+1</answer>", 0.8)]
    # three wrong answers with the same VALUE (30) written differently: votes count values
    wrong = [completion("<answer>2*3*5*1</answer>", 0.1), completion("<answer>(2*3)*(5*1)</answer>", 0.0),
             completion("<answer>5*3*2*1</answer>", 0.3)]
    garbage = [completion("no answer", 1.0)]
    chosen = ev.select_answer(right + wrong + garbage, "vote")
    assert chosen is wrong[2]  # the majority value, highest V among its samples
    assert ev.sparse_reward(chosen.text, p) == 0.0  # majority wrong -> BoN wrong: no oracle
    assert ev.select_answer(right + wrong + garbage, "value") is garbage[0]  # value head alone
    # a 2-2 tie between values is broken by the value head
    tie = right + wrong[:2]
    assert ev.select_answer(tie, "vote") is right[0]
    assert ev.select_answer([garbage[0], completion("??", 2.0)], "vote").text == "??"
    with pytest.raises(ValueError, match="bon selection"):
        ev.select_answer(tie, "oracle")


def test_bon_through_the_harness_picks_the_wrong_majority():
    p = sum_problem(0)
    sampler = ScriptedSampler({p: [(product_answer(p), 0.0), (steps_trace(p), 0.9),
                                   (product_answer(p), 0.0)]})
    texts, _, _ = ev.answer_with_search(sampler, [p], "bon", 512, max_new_tokens=64)
    assert sampler.drawn[tuple(prompt_ids(p, sampler.tokenizer))] >= 3
    assert texts == [product_answer(p)] and ev.sparse_reward(texts[0], p) == 0.0
    texts, _, _ = ev.answer_with_search(sampler, [p], "bon", 512, max_new_tokens=64,
                                        bon_select="value")
    assert texts == [steps_trace(p)] and ev.sparse_reward(texts[0], p) == 1.0


def test_paired_difference_by_hand():
    # differences model - baseline: +1, 0, +0.5, 0 -> mean 0.375; sample std (ddof 1):
    # deviations 0.625, -0.375, 0.125, -0.375 -> squares sum 0.390625+0.140625+0.015625+0.140625
    # = 0.6875; / 3; sqrt; / sqrt(4); * 1.96
    r = ev.paired_difference([0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 1.0, 0.25])
    assert r["difference"] == pytest.approx(0.375)
    assert r["difference_ci95"] == pytest.approx(1.96 * math.sqrt(0.6875 / 3) / 2)
    # a constant shift has no spread: the paired CI is 0 where the separate CIs are wide
    assert ev.paired_difference([0.0, 1.0, 0.5], [0.1, 1.1, 0.6])["difference_ci95"] == pytest.approx(0)
    with pytest.raises(ValueError, match="same problems"):
        ev.paired_difference([0.0], [0.0, 1.0])


def test_threads_flag_sets_torch_threads_or_fails_in_one_line(tiny_test_model, tmp_path):
    import torch

    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        ev.main(ev.Args(checkpoint=str(tiny_test_model), threads=0, out=tmp_path / "s.json"))
    before = torch.get_num_threads()
    try:
        summary = ev.main(ev.Args(checkpoint=str(tiny_test_model), threads=1, limit=2, n=2,
                                  out=tmp_path / "s.json"))
        assert torch.get_num_threads() == 1 and summary["n_problems"] == 2
    finally:
        torch.set_num_threads(before)
    # which model and which CPU: two runs' evals are paired only when the checksums agree
    from value_head import model_checksum
    assert summary["checkpoint_checksum"] == model_checksum(str(tiny_test_model))
    assert len(summary["checkpoint_checksum"]) == 32 and "cores" in summary["machine"]
    assert model_checksum("Qwen/Qwen2.5-0.5B") is None  # a hub id: nothing local to fingerprint


@pytest.mark.parametrize("flags, message", [
    ({"limit": 0}, "eval.py: error: --limit must be >= 1, got 0"), ({"limit": -1}, "eval.py: error: --limit must be >= 1, got -1"),
    ({"n": 0}, "eval.py: error: --n must be >= 1, got 0"), ({"budget_tokens": (64, 0)}, "eval.py: error: --budget-tokens must be >= 1"),
    ({"temperature": -0.5}, "eval.py: error: --temperature must be a finite number >= 0"),
])
def test_bad_values_are_refused_before_loading_the_model(tmp_path, flags, message):
    # the checkpoint does not exist: a check that ran after loading would report that instead
    with pytest.raises(SystemExit) as err:
        ev.main(ev.Args(checkpoint=str(tmp_path / "missing"), out=tmp_path / "s.json", **flags))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_out_under_a_file_is_refused_before_loading_the_model(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot create its directory"):
        ev.main(ev.Args(checkpoint=str(tmp_path / "missing"), out=tmp_path / "file" / "s.json"))


def test_run_dir_whose_latest_names_a_missing_step_says_so(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "latest").write_text("step-000004\n")
    with pytest.raises(SystemExit) as err:
        ev.main(ev.Args(checkpoint=str(tmp_path / "run"), out=tmp_path / "s.json"))
    assert "names 'step-000004', which is not a checkpoint" in str(err.value)
    assert "no such local directory" not in str(err.value)
