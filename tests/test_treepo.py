"""treepo.py against hand-built trees and a scripted deterministic sampler (numbers worked out by
hand in the comments), plus one check with the real tiny model."""

import math

import pytest
from fakes import CharTokenizer, FakeCompletion

import countdown
from countdown import ANSWER_CLOSE, Problem
from treepo import TreePOConfig, branching_budget, has_repetition, tree_advantages, treepo_rollouts

P10 = Problem(nums=(1, 2, 3, 4), target=10)
P24 = Problem(nums=(1, 2, 3, 4), target=24)
P14 = Problem(nums=(2, 3, 4, 5), target=14)


def char_logprob(ch: str) -> float:
    return -ord(ch) / 1000


class ScriptedSampler:
    """Deterministic policy: script(prompt_text, completion_so_far) lists options (segment text,
    finish_reason); the j-th copy of one context in a call takes option j mod len. Records every
    call; counts forward tokens as each distinct context once + the sampled tokens."""

    def __init__(self, script):
        self.tokenizer = CharTokenizer()
        self.script = script
        self.calls = []
        self.tokens_generated = self.forward_tokens = 0

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 stop=(ANSWER_CLOSE,), want_values=False):
        self.calls.append({"prompts": [list(p) for p in prompts], "n": n, "max_new": max_new_tokens,
                           "stop": tuple(stop), "outputs": []})
        seen, out = {}, []
        self.forward_tokens += sum(len(p) for p in {tuple(p) for p in prompts})
        for p in prompts:
            prompt_text, completion = self.tokenizer.decode(p).split("\n", 1)
            row = []
            for _ in range(n):
                j = seen.get(tuple(p), 0)
                seen[tuple(p)] = j + 1
                options = self.script(prompt_text, completion)
                text, reason = options[j % len(options)]
                assert len(text) <= max_new_tokens
                self.tokens_generated += len(text)
                self.forward_tokens += len(text)
                self.calls[-1]["outputs"].append((text, reason))
                row.append(FakeCompletion([ord(c) for c in text], [char_logprob(c) for c in text],
                                          text, reason))
            out.append(row)
        return out


def completions_of(sampler, call):
    return [sampler.tokenizer.decode(p).split("\n", 1)[1] for p in call["prompts"]]


# --- tree advantage (paper eq. 5 + REINFORCE++ global whitening), by hand -----------------------

def test_tree_advantages_hand_computed_one_tree():
    # P -> A -> {A1, A2};  P -> B -> B1;  P -> C (a path that stopped after one segment)
    paths = [("P", "A", "A1"), ("P", "A", "A2"), ("P", "B", "B1"), ("P", "C")]
    rewards = [1.0, 0.0, 0.5, -1.0]
    # root group: mean (1 + 0 + 0.5 - 1) / 4 = 0.125; subgroup A = {t1, t2}: mean 0.5;
    # B, C and the leaves are singletons: skipped.
    # raw: t1 = mean(1 - 0.125, 1 - 0.5) = 0.6875     t2 = mean(-0.125, -0.5) = -0.3125
    #      t3 = 0.5 - 0.125 = 0.375                   t4 = -1 - 0.125 = -1.125
    raw = [0.6875, -0.3125, 0.375, -1.125]
    # whitening, equal weights: mean = -0.375 / 4 = -0.09375
    # deviations 0.78125, -0.21875, 0.46875, -1.03125; squares sum to 1.94140625; unbiased / 3
    mean, var = -0.09375, 1.94140625 / 3
    got = tree_advantages(paths, rewards)
    assert got == pytest.approx([(a - mean) / math.sqrt(var + 1e-8) for a in raw], abs=1e-12)
    assert got[0] == pytest.approx(0.78125 / math.sqrt(0.647135416666), abs=1e-7)  # ~0.97116


def test_tree_advantages_two_prompts_token_weighted():
    # prompt P: P -> A -> {A1 (r=1), A2 (r=0)};  prompt Q: Q -> D (r=1), Q -> E (r=1)
    paths = [("P", "A", "A1"), ("P", "A", "A2"), ("Q", "D"), ("Q", "E")]
    rewards = [1.0, 0.0, 1.0, 1.0]
    lengths = [3, 1, 2, 2]
    # P root mean 0.5 and subgroup A mean 0.5: raw t1 = 0.5, t2 = -0.5; Q: both 0 (subgroups
    # never cross prompts). Token-weighted mean over 8 tokens: (3*0.5 - 1*0.5) / 8 = 0.125
    # sum w (a - m)^2 = 3*0.375^2 + 0.625^2 + 4*0.125^2 = 0.421875 + 0.390625 + 0.0625 = 0.875
    mean, var = 0.125, 0.875 / 7
    want = [(a - mean) / math.sqrt(var + 1e-8) for a in (0.5, -0.5, 0.0, 0.0)]
    assert tree_advantages(paths, rewards, lengths) == pytest.approx(want, abs=1e-12)


def test_tree_advantages_bad_input():
    with pytest.raises(ValueError, match="same length"):
        tree_advantages([("P", "A")], [1.0, 0.0])


# --- branching budget, repetition -----------------------------------------------------------------

def test_branching_budget_transfer_by_hand():
    cfg = TreePOConfig(branch=2, width=16)
    # 3 survivors, 1 path stopped this round, 5 finished in all: min(16 - 5, 2 * 4) = 8 -> 3, 3, 2
    assert branching_budget(3, 1, 5, cfg) == [3, 3, 2]
    # width-capped: 2 survivors, 13 finished: min(3, 4) = 3 -> 2, 1
    assert branching_budget(2, 0, 13, cfg) == [2, 1]
    # no early stop: plain binary tree
    assert branching_budget(4, 0, 0, cfg) == [2, 2, 2, 2]


def test_has_repetition():
    assert has_repetition("ab" * 7, 8, 4)  # "abababab" at 0, 2, 4, 6
    assert not has_repetition("ab" * 6, 8, 4)  # only 3 occurrences
    assert not has_repetition("13-4=9</step>9*3=27</step>27-3=24</step><answer>(13-4)*3-3</answer>",
                              8, 4)


# --- sampling with a scripted policy ------------------------------------------------------------

def test_full_binary_tree_one_call_per_depth():
    # no early stop: every segment is cut at L; depth d = 4, b = 2 -> 2, 4, 8, 16 paths per depth
    def script(prompt, completion):
        return [("xyzw"[len(completion) // 4 % 4] + "0123"[k] * 3, "length") for k in range(2)]

    sampler = ScriptedSampler(script)
    cfg = TreePOConfig(segment_len=4, max_depth=4, branch=2, width=16)
    out = treepo_rollouts([P10, P24], sampler, cfg)
    # ALL active paths of ALL prompts of one depth in one call: 2 prompts x (2, 4, 8, 16)
    assert [len(c["prompts"]) for c in sampler.calls] == [4, 8, 16, 32]
    for depth, call in enumerate(sampler.calls, 1):
        assert call["max_new"] == 4 and call["stop"] == (ANSWER_CLOSE,)
        assert {len(x) for x in completions_of(sampler, call)} == {4 * (depth - 1)}
    assert len(out) == 32 and out[0]["stats"]["trajectories"] == 32
    assert out[0]["stats"]["sampler_calls"] == 4 and out[0]["stats"]["fallbacks"] == 0
    for g in (0, 1):
        texts = {sampler.tokenizer.decode(t["tokens"]) for t in out if t["group"] == g}
        assert len(texts) == 16  # 16 distinct leaves of a full binary tree of depth 4
    assert all(t["finish"] == "max_depth" and t["n_segments"] == 4 for t in out)
    # shared prefixes: each distinct context once per call, fanned out to its 2 branches
    contexts = sum(len({tuple(p) for p in c["prompts"]}) for c in sampler.calls)
    assert contexts == 2 * (1 + 2 + 4 + 8)  # not 2 * (2 + 4 + 8 + 16)
    assert out[0]["stats"]["tokens_generated"] == 2 * 4 * (2 + 4 + 8 + 16)


def test_budget_transfer_scripted():
    # w = 8, b = 2, d = 3. Round 1: the root forks 2; copy 0 goes on ("A..."), copy 1 answers.
    # Transfer: 1 survivor, 1 stopped, 1 finished -> min(8 - 1, 2 * 2) = 4 branches for A (not 2).
    # Round 2: 4 survivors, 0 stopped -> min(7, 8) = 7 -> 2, 2, 2, 1. Round 3 = depth 3: all stop.
    answer = "<answer>1+2+3+4</answer>"

    def script(prompt, completion):
        if completion == "":
            return [("Aaaa", "length"), (answer, "answer")]
        return [(c + "bcd", "length") for c in "QRST"]

    sampler = ScriptedSampler(script)
    cfg = TreePOConfig(segment_len=32, max_depth=3, branch=2, width=8)
    out = treepo_rollouts([P10], sampler, cfg)
    assert [len(c["prompts"]) for c in sampler.calls] == [2, 4, 7]
    assert set(completions_of(sampler, sampler.calls[1])) == {"Aaaa"}
    second = completions_of(sampler, sampler.calls[2])
    assert sorted(second.count(x) for x in set(second)) == [1, 2, 2, 2]
    assert len(out) == 8  # never more than w, and exactly w
    assert sorted(t["finish"] for t in out) == ["answer"] + ["max_depth"] * 7
    assert out[0]["stats"]["fallbacks"] == 0


def test_width_never_exceeded_with_random_stops():
    # stops at pseudo-random places: finished + in flight never exceeds w, and ends at exactly w
    def script(prompt, completion):
        h = sum(map(ord, completion)) % 7
        return [(f"{h}{k}", "answer" if (h + k) % 3 == 0 else "length") for k in range(3)]

    prompts = ("make 10", "make 24", "make 14")
    for width, branch in [(5, 2), (16, 2), (7, 3)]:
        sampler = ScriptedSampler(script)
        cfg = TreePOConfig(segment_len=4, max_depth=5, branch=branch, width=width)
        out = treepo_rollouts([P10, P24, P14], sampler, cfg)
        finished = [0, 0, 0]
        for call in sampler.calls:
            texts = [sampler.tokenizer.decode(p) for p in call["prompts"]]
            groups = [next(g for g, m in enumerate(prompts) if m in x) for x in texts]
            for g in range(3):
                assert finished[g] + groups.count(g) <= width
            for g, x, (seg, reason) in zip(groups, texts, call["outputs"]):
                depth = len(x.split("\n", 1)[1]) // 2 + 1  # every scripted segment is 2 chars
                finished[g] += reason == "answer" or depth == cfg.max_depth
        assert finished == [width] * 3
        assert [sum(t["group"] == g for t in out) for g in range(3)] == [width] * 3


def test_fallback_scripted():
    # w = 6, b = 2, d = 3. Round 1: root -> A, B (both go on). Round 2: A -> answer, eos;
    # B -> two repetitions. 4 finished, none active, 4 < 6: fallback. Candidates are A's children
    # only (answer/eos); each picks a boundary: depth 0 (the prompt) or depth 1 ("A"), never B.
    # Budget 6 - 4 = 2 -> one candidate forks 2 branches. Round 3: those answer -> 6 in all.
    answer = "<answer>1+2+3+4</answer>"

    def script(prompt, completion):
        if completion == "":
            return [("A", "length"), ("B", "length")]
        if completion == "A":
            return [(answer, "answer"), ("<|eos|>", "eos")]
        if completion == "B":
            return [("ab" * 7, "length"), ("cd" * 7, "length")]
        return [(answer, "answer")]

    boundaries = set()
    for seed in range(8):
        sampler = ScriptedSampler(script)
        cfg = TreePOConfig(segment_len=32, max_depth=3, branch=2, width=6, seed=seed)
        out = treepo_rollouts([P10], sampler, cfg)
        fallback_from = completions_of(sampler, sampler.calls[2])
        assert fallback_from[0] == fallback_from[1] and fallback_from[0] in ("", "A")
        boundaries.add(fallback_from[0])
        assert len(out) == 6 and out[0]["stats"]["fallbacks"] == 1
        finishes = sorted(t["finish"] for t in out)
        if fallback_from[0] == "A":  # A forks again: answer + eos
            assert [len(c["prompts"]) for c in sampler.calls] == [2, 4, 2]
            assert finishes == ["answer"] * 2 + ["eos"] * 2 + ["repetition"] * 2
        else:  # the prompt forks A', B'; budget min(6 - 4, 2 * 2) = 2 -> 1 each; A' answers
            assert [len(c["prompts"]) for c in sampler.calls] == [2, 4, 2, 2]
            assert finishes == ["answer"] * 2 + ["eos"] + ["repetition"] * 3
    assert boundaries == {"", "A"}  # the boundary is random


def test_fallback_from_the_prompt():
    # w = 4: both depth-1 paths answer at once -> fallback; the only boundary is the prompt.
    def script(prompt, completion):
        return [("<answer>1+2+3+4</answer>", "answer"), ("<answer>1*2*3*4</answer>", "answer")]

    sampler = ScriptedSampler(script)
    out = treepo_rollouts([P10], sampler, TreePOConfig(segment_len=32, width=4))
    assert [len(c["prompts"]) for c in sampler.calls] == [2, 2]
    assert set(completions_of(sampler, sampler.calls[1])) == {""}
    assert len(out) == 4 and out[0]["stats"]["fallbacks"] == 1


def test_rollout_fields_and_dynamic_sampling():
    # P10: every answer "1+2+3+4" is right; P14 (nums 2 3 4 5): that answer is wrong (multiset);
    # P24: copy 0 "1*2*3*4" (right, r = 1), copy 1 "1+2+3+4" (r = 1 - 2 * 14/24 = -1/6).
    # w = 4: round 1 forks 2, both answer; fallback from the prompt forks the other 2.
    def script(prompt, completion):
        if "make 24" in prompt:
            return [("<answer>1*2*3*4</answer>", "answer"), ("<answer>1+2+3+4</answer>", "answer")]
        return [("<answer>1+2+3+4</answer>", "answer")]

    cfg = TreePOConfig(segment_len=32, width=4, dynamic_sampling=False)
    out = treepo_rollouts([P10, P24, P14], ScriptedSampler(script), cfg)
    assert len(out) == 12
    for t in out:
        text = "".join(map(chr, t["tokens"]))
        assert t["old_logprobs"] == [char_logprob(c) for c in text]
        assert t["reward"] == countdown.dense_reward(text, [P10, P24, P14][t["group"]])
        assert t["advantages"] == [t["advantage"]] * len(t["tokens"])
        assert t["prompt_ids"] == CharTokenizer()(countdown.make_prompt([P10, P24, P14][t["group"]]))[
            "input_ids"]

    out = treepo_rollouts([P10, P24, P14], ScriptedSampler(script),
                          TreePOConfig(segment_len=32, width=4, dynamic_sampling=True))
    assert {t["group"] for t in out} == {1} and out[0]["stats"]["dropped_groups"] == 2
    assert sorted(t["reward"] for t in out) == pytest.approx([-1 / 6, -1 / 6, 1, 1])
    # root group only: raw = +-(1 + 1/6) / 2 = +-7/12; 4 x 24 tokens, mean 0,
    # var = 96 * (7/12)^2 / 95 -> A = +-(7/12) / sqrt(var) = +-sqrt(95/96)
    for t in out:
        assert t["advantage"] == pytest.approx(math.copysign(math.sqrt(95 / 96), t["reward"]),
                                               abs=1e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="reward"):
        TreePOConfig(reward="binary")
    with pytest.raises(ValueError, match="width"):
        TreePOConfig(width=0)


# --- the real tiny model -------------------------------------------------------------------------

@pytest.mark.slow  # the session fixture builds the tiny model (seconds to minutes on a busy box)
def test_tiny_model_rollouts_match_teacher_forced_logprobs(tiny_sampler):
    import torch

    from losses import token_logprobs

    sampler, policy, tokenizer = tiny_sampler, tiny_sampler.policy, tiny_sampler.tokenizer
    cfg = TreePOConfig(segment_len=8, max_depth=4, branch=2, width=6)
    problems = countdown.make_splits(seed=0, n_train=0, n_test=2)[1]
    out = treepo_rollouts(problems, sampler, cfg)
    assert [sum(t["group"] == g for t in out) for g in range(2)] == [6, 6]
    for t in out:
        problem = problems[t["group"]]
        assert 0 < len(t["tokens"]) == len(t["old_logprobs"]) <= 8 * 4
        text = tokenizer.decode(t["tokens"], skip_special_tokens=True)
        assert t["reward"] == countdown.dense_reward(text, problem)
        ids = torch.tensor([t["prompt_ids"] + t["tokens"]])
        with torch.no_grad():
            logits, _ = policy(ids)
        p = len(t["prompt_ids"])
        ref = token_logprobs(logits[:, p - 1:-1], ids[:, p:])[0]
        assert torch.allclose(torch.tensor(t["old_logprobs"]), ref, atol=1e-4)
    assert out[0]["stats"]["tokens_generated"] <= sum(len(t["tokens"]) for t in out)
