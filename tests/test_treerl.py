"""TreeRL / EPTree: advantages of hand-built trees computed by hand, forking points chosen by hand
on scripted responses, budgets, one sampler call per iteration, and the real tiny model."""

import math
from dataclasses import dataclass

import pytest
import torch

import losses
from countdown import ANSWER_CLOSE, ANSWER_OPEN, STEP_END, Problem
from treerl import (
    Segment,
    TreeRLConfig,
    fork,
    forkable_positions,
    forking_points,
    leaf_paths,
    monte_carlo_values,
    tree_advantages,
    treerl_rollouts,
)

TAGS = (STEP_END, ANSWER_OPEN, ANSWER_CLOSE)
PROBLEM = Problem((1, 2, 3, 4), 10)
RIGHT, WRONG = f"{ANSWER_OPEN}1+2+3+4{ANSWER_CLOSE}", f"{ANSWER_OPEN}1+2+3-4{ANSWER_CLOSE}"


class CharTokenizer:
    """Stand-in for tiny.build_tokenizer: one id per character, the three tags single tokens."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            tag = next((t for t in TAGS if text.startswith(t, i)), None)
            ids.append(1000 + TAGS.index(tag) if tag else ord(text[i]))
            i += len(tag) if tag else 1
        return ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(TAGS[i - 1000] if i >= 1000 else chr(i) for i in ids)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids) for ids in batch]


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    value: float | None = None


class ScriptedSampler:
    """Deterministic fake: the completion after a prefix (the text generated so far, after the
    prompt's last newline) is script[prefix][k % len] for sample k, either a text (log-prob -0.1
    per token) or (text, logprobs); prefixes not in the script use the list `default`. It cuts at
    max_new_tokens ("length") and records its calls."""

    def __init__(self, script: dict, default: list = (WRONG,)):
        self.tokenizer, self.script, self.default = CharTokenizer(), script, default
        self.calls: list[dict] = []
        self.tokens_generated = self.forward_tokens = 0

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 stop=(STEP_END, ANSWER_CLOSE), want_values=False):
        self.calls.append({"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "stop": stop})
        self.forward_tokens += sum(len(p) for p in set(map(tuple, prompts)))
        out = []
        for p in prompts:
            prefix = self.tokenizer.decode(p).rsplit("\n", 1)[1]
            group = []
            for k in range(n):
                options = self.script.get(prefix, self.default)
                item = options[k % len(options)]
                text, logprobs = item if isinstance(item, tuple) else (item, None)
                tokens = self.tokenizer.encode(text)[:max_new_tokens]
                logprobs = (logprobs or [-0.1] * len(tokens))[:len(tokens)]
                reason = "answer" if text.endswith(ANSWER_CLOSE) and len(tokens) == len(
                    self.tokenizer.encode(text)) else "length"
                self.tokens_generated += len(tokens)
                self.forward_tokens += len(tokens)
                group.append(Completion(tokens, logprobs, self.tokenizer.decode(tokens), reason))
            out.append(group)
        return out


def leaf(tokens, reward):
    return Segment(tokens=tokens, logprobs=[0.0] * len(tokens), reward=reward)


def node(tokens, *children):
    return Segment(tokens=tokens, logprobs=[0.0] * len(tokens), children=list(children))


def test_tree_advantages_by_hand():
    # root ─┬─ A[1,2] ─┬─ C[3] ─┬─ E[5]   r=1
    #       │          │        └─ F[6]   r=1
    #       │          └─ D[4]            r=0
    #       └─ B[7]                       r=0
    e, f, d, b = leaf([5], 1.0), leaf([6], 1.0), leaf([4], 0.0), leaf([7], 0.0)
    c = node([3], e, f)
    a = node([1, 2], c, d)
    root = node([], a, b)
    # V(root) = 2/4 = 1/2, V(A) = 2/3 (|L|=3), V(C) = 1 (|L|=2), V(E)=V(F)=1, V(D)=V(B)=0
    values = monte_carlo_values(root)
    assert values[root] == (0.5, 4) and values[c] == (1.0, 2) and values[b] == (0.0, 1)
    assert values[a][1] == 3 and values[a][0] == pytest.approx(2 / 3)
    adv = tree_advantages(root)
    # A: GA = 2/3 - 1/2 = 1/6, LA = 2/3 - 1/2 = 1/6 (parent is the root); (1/6+1/6)/sqrt(3)
    assert adv[a] == pytest.approx(0.19245009, abs=1e-7)
    # C: GA = 1 - 1/2 = 0.5, LA = 1 - 2/3 = 1/3; 0.8333.../sqrt(2) = 0.58925565
    assert adv[c] == pytest.approx(0.58925565, abs=1e-7)
    # E, F: GA = 0.5, LA = 1 - 1 = 0, |L| = 1
    assert adv[e] == adv[f] == pytest.approx(0.5)
    # D: GA = -0.5, LA = 0 - 2/3; -7/6.   B: GA = LA = -0.5; -1
    assert adv[d] == pytest.approx(-7 / 6) and adv[b] == pytest.approx(-1.0)
    assert set(adv) == {a, b, c, d, e, f}  # every step but the root
    assert [[s.tokens for s in p] for p in leaf_paths(root)] == [
        [[1, 2], [3], [5]], [[1, 2], [3], [6]], [[1, 2], [4]], [[7]]]


def test_tree_advantages_dense_rewards_are_means():
    # root ─┬─ A ─┬─ x  r=0.5
    #       │     └─ y  r=-1
    #       └─ z        r=0.2
    x, y, z = leaf([2], 0.5), leaf([3], -1.0), leaf([4], 0.2)
    a = node([1], x, y)
    root = node([], a, z)
    # V(root) = (0.5 - 1 + 0.2)/3 = -0.1; V(A) = -0.25 (|L|=2)
    adv = tree_advantages(root)
    assert adv[a] == pytest.approx(2 * (-0.25 + 0.1) / math.sqrt(2))  # -0.21213
    assert adv[x] == pytest.approx((0.5 + 0.1) + (0.5 + 0.25))  # 1.35
    assert adv[y] == pytest.approx((-1 + 0.1) + (-1 + 0.25))  # -1.65
    assert adv[z] == pytest.approx(2 * (0.2 + 0.1))  # 0.6


def test_leaf_without_reward_is_an_error():
    with pytest.raises(ValueError, match="reward"):
        tree_advantages(node([], node([1], leaf([2], 1.0), Segment(tokens=[3]))))


def test_forkable_positions_exclude_first_last_and_answer():
    tok = CharTokenizer()
    ids = tok.encode(f"ab{STEP_END}c{RIGHT}")  # a b </step> c <answer> 1 + 2 + 3 + 4 </answer>
    ok = forkable_positions(ids, tok)
    assert ok == [False, True, True, True, True] + [False] * (len(ids) - 5)
    assert forkable_positions(tok.encode("abc"), tok) == [False, True, False]


def test_forking_points_top_n_entropy_by_hand():
    tok = CharTokenizer()
    ids = tok.encode(f"abcde{RIGHT}")  # positions 0..4 = a..e, 5 = <answer>, then the answer
    logprobs = [-9.0, -1.0, -3.0, -0.5, -3.0, -2.0] + [-8.0] * (len(ids) - 6)
    tree = Segment(ids, logprobs, forkable_positions(ids, tok))
    # -logp of forkable positions 1..5: 1, 3, 0.5, 3, 2 (0 is first, 6.. are after <answer>)
    # top-3: positions 2 and 4 (tie at 3: earlier first), then 5
    points = forking_points(tree, 3)
    assert [(seg is tree, i) for seg, i, _ in points] == [(True, 2), (True, 4), (True, 5)]
    assert [prefix for *_, prefix in points] == [ids[:2], ids[:4], ids[:5]]  # before the fork
    # forking at 4 splits the segment: the tail starts with the old token 4, now not forkable
    branch = Segment([77, 78], [-6.0, -7.0], [False, False])
    fork(tree, 4, [branch])
    tail = tree.children[0]
    assert tree.tokens == ids[:4] and tail.tokens == ids[4:] and tree.children[1] is branch
    assert tail.forkable[0] is False and tail.logprobs == logprobs[4:]
    # now the top-2 are position 2 (root segment) and 5 (-logp 2, position 1 of the tail)
    points = forking_points(tree, 2)
    assert [(seg, i) for seg, i, _ in points] == [(tree, 2), (tail, 1)]
    assert points[1][2] == ids[:5]


def scripted_two_tree_sampler() -> ScriptedSampler:
    tok = CharTokenizer()
    r0 = f"ab{RIGHT}"  # correct; the peak is at 'b' (position 1)
    r1 = f"xy{WRONG}"  # wrong; peak at 'y'
    lp0 = [-0.1, -3.0] + [-0.1] * (len(tok.encode(r0)) - 2)
    lp1 = [-0.1, -2.0] + [-0.1] * (len(tok.encode(r1)) - 2)
    return ScriptedSampler({"": [(r0, lp0), (r1, lp1)], "a": [f"c{WRONG}"], "x": [f"z{RIGHT}"]})


def test_rollouts_end_to_end_by_hand():
    sampler = scripted_two_tree_sampler()
    cfg = TreeRLConfig(M=2, N=1, L=1, T=1, max_new_tokens=40)
    rows = treerl_rollouts([PROBLEM], sampler, cfg)
    # Tree: root ─┬─ "a" ─┬─ "b"+RIGHT   r=1
    #             │       └─ "c"+WRONG   r=0
    #             └─ "x" ─┬─ "y"+WRONG   r=0
    #                     └─ "z"+RIGHT   r=1
    # V(root) = V("a") = V("x") = 1/2: the shared steps get 0; right leaves 0.5 + 0.5 = 1, wrong -1
    assert [r["text"] for r in rows] == [f"ab{RIGHT}", f"ac{WRONG}", f"xy{WRONG}", f"xz{RIGHT}"]
    n = len(RIGHT) - len(ANSWER_OPEN) - len(ANSWER_CLOSE) + 3  # tokens after the shared step
    for r, sign in zip(rows, (1, -1, -1, 1)):
        assert r["advantages"] == [0.0] + [float(sign)] * n
        assert len(r["tokens"]) == len(r["old_logprobs"]) == len(r["advantages"]) == 1 + n
        # dense reward (logged): right 1; wrong 1+2+3-4 = 2: 1 - 2 * |10 - 2| / 10 = -0.6
        assert r["group"] == 0 and r["reward"] == pytest.approx(1.0 if sign > 0 else -0.6)
        assert r["tokens"] == sampler.tokenizer.encode(r["text"])
    assert rows[0]["old_logprobs"][:2] == [-0.1, -3.0]  # the original response's logprobs
    assert rows[1]["old_logprobs"][:2] == [-0.1, -0.1]  # prefix from it, then the branch's
    # the branch prompts are the prompt plus the prefix BEFORE the forking token
    prompt = sampler.calls[0]["prompts"][0]
    assert sampler.calls[1]["prompts"] == [prompt + [ord("a")], prompt + [ord("x")]]
    assert all(c["stop"] == (ANSWER_CLOSE,) for c in sampler.calls)
    stats = rows[0]["stats"]
    assert stats["trajectories"] == 4 and stats["sampler_calls"] == 2 and stats["forks"] == 2
    assert stats["tokens_generated"] == sampler.tokens_generated


def test_dense_flag_changes_the_values():
    sampler = scripted_two_tree_sampler()
    rows = treerl_rollouts([PROBLEM], sampler, TreeRLConfig(M=2, N=1, L=1, T=1, reward="dense"))
    # leaves: right 1, wrong -0.6 (one of each under "a" and under "x"): V(root) = V("a") =
    # V("x") = 0.2, so the shared steps get 0 and the leaves 2 * (r - 0.2) = +1.6 / -1.6
    assert [r["advantages"][-1] for r in rows] == pytest.approx([1.6, -1.6, -1.6, 1.6])
    assert all(r["advantages"][0] == pytest.approx(0.0) for r in rows)


@pytest.mark.parametrize("m,n,l,t", [(6, 2, 1, 2), (2, 3, 2, 2), (1, 1, 3, 3), (3, 2, 0, 2)])
def test_budget_and_one_sampler_call_per_iteration(m, n, l, t):
    # every response and branch has 4 forkable tokens (positions 1-4, up to <answer>), and
    # siblings differ from their first token, so every branch prompt is new
    responses = [f"{i}{i + 1}{STEP_END}{i}{WRONG}" for i in range(5)] + [f"98{STEP_END}7{RIGHT}"]
    branches = [f"qr{STEP_END}s{RIGHT}", f"uv{STEP_END}w{WRONG}", f"kl{STEP_END}m{RIGHT}"]
    sampler = ScriptedSampler({"": responses}, default=branches)
    problems = [PROBLEM, Problem((2, 3, 4, 5), 14), Problem((1, 1, 2, 3), 7)]
    cfg = TreeRLConfig(M=m, N=n, L=l, T=t, max_new_tokens=24)
    rows = treerl_rollouts(problems, sampler, cfg)
    assert len(sampler.calls) == 1 + l  # all prompts together: one call per iteration
    assert sampler.calls[0]["n"] == m and all(c["n"] == t for c in sampler.calls[1:])
    for g in range(len(problems)):
        # every response has enough forkable tokens, so the budget is reached exactly
        assert sum(r["group"] == g for r in rows) == m * (1 + n * t * l)
    for call in sampler.calls[1:]:
        assert len(call["prompts"]) == len(problems) * m * n  # N forking points per tree
    # a position is forked at most once: all branch prompts of all iterations differ
    branch_prompts = [tuple(p) for c in sampler.calls[1:] for p in c["prompts"]]
    assert len(branch_prompts) == len(set(branch_prompts))
    assert all(len(r["tokens"]) <= cfg.max_new_tokens for r in rows)
    assert rows[0]["stats"]["max_leaves"] == m * (1 + n * t * l)


def test_branches_are_cut_at_the_completion_budget():
    tok = CharTokenizer()
    r0 = f"abcdefgh{RIGHT}"  # forks at 'c' (position 2) and 'g' (6)
    lp = [-0.1, -0.1, -4.0, -0.1, -0.1, -0.1, -5.0] + [-0.1] * (len(tok.encode(r0)) - 7)
    sampler = ScriptedSampler({"": [(r0, lp)]}, default=[f"zzzzzzzz{RIGHT}"])
    rows = treerl_rollouts([PROBLEM], sampler, TreeRLConfig(M=1, N=2, L=1, T=1, max_new_tokens=10))
    # the response itself is cut at 10 by the sampler: "abcdefgh<answer>1" (length); the call
    # for the branches runs to 10 - 2 (the shortest prefix), so the branch after "abcdef" comes
    # back with 8 tokens and is cut at its own budget, 10 - 6 = 4, by treerl
    assert sampler.calls[1]["max_new_tokens"] == 8
    assert [r["text"] for r in rows] == ["abcdefgh" + ANSWER_OPEN + "1", "abcdefzzzz", "abzzzzzzzz"]
    assert [r["finish_reason"] for r in rows] == ["length"] * 3


def test_no_forkable_token_stops_early():
    sampler = ScriptedSampler({"": [RIGHT]})  # everything after <answer> is masked
    rows = treerl_rollouts([PROBLEM], sampler, TreeRLConfig(M=2, N=2, L=3, T=2))
    assert len(sampler.calls) == 1 and len(rows) == 2
    assert all(r["advantages"] == [0.0] * len(r["tokens"]) for r in rows)  # all right: V = V(root)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="reward"):
        treerl_rollouts([PROBLEM], ScriptedSampler({}), TreeRLConfig(reward="pass@k"))
    with pytest.raises(ValueError, match="M, N, T"):
        treerl_rollouts([PROBLEM], ScriptedSampler({}), TreeRLConfig(T=0))


@pytest.fixture(scope="module")
def tiny_policy(tiny_test_model):
    """The conftest's trained tiny test model (never a silent switch to random weights)."""
    from transformers import AutoTokenizer

    from value_head import PolicyWithValue

    return (PolicyWithValue.from_pretrained(tiny_test_model).eval(),
            AutoTokenizer.from_pretrained(tiny_test_model))


def test_tiny_model_trajectories_match_teacher_forcing(tiny_policy):
    from sampler import TorchSampler

    policy, tok = tiny_policy
    sampler = TorchSampler(policy, tok, seed=0)
    problems = [PROBLEM, Problem((3, 5, 7, 9), 24)]
    cfg = TreeRLConfig(M=3, N=2, L=1, T=2, max_new_tokens=48)
    rows = treerl_rollouts(problems, sampler, cfg)
    assert rows[0]["stats"]["sampler_calls"] == 2
    for g in range(2):
        assert 3 <= sum(r["group"] == g for r in rows) <= 3 * (1 + 2 * 2)
    for r in rows:
        assert 0 < len(r["tokens"]) <= 48
        assert len(r["tokens"]) == len(r["old_logprobs"]) == len(r["advantages"])
        assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
        ids = torch.tensor([r["prompt_ids"] + r["tokens"]])
        with torch.no_grad():
            logits, _ = policy(ids)
        p = len(r["prompt_ids"])
        teacher = losses.token_logprobs(logits[:, p - 1:-1], ids[:, p:])[0]
        torch.testing.assert_close(torch.tensor(r["old_logprobs"]), teacher, rtol=0, atol=1e-4)
