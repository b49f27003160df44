"""mcts.py against a scripted deterministic policy (numbers worked out by hand in the comments),
plus one end-to-end check with the real tiny model."""

import dataclasses
import json
import math

import pytest
from fakes import CharTokenizer, FakeCompletion

import countdown
from countdown import ANSWER_CLOSE, STEP_END, Problem
from mcts import (
    MCTSConfig,
    Node,
    backup,
    evaluate,
    expand,
    greedy_select,
    puct_score,
    search,
    search_tree_to_dict,
    select_leaf,
)

PROBLEM = Problem(nums=(1, 2, 3, 4), target=10)


class ScriptedSampler:
    """Deterministic policy: script(completion_so_far, stop) lists options (text, summed logprob,
    finish_reason, value); sample j of n takes option j mod len. Records every call."""

    def __init__(self, script):
        self.tokenizer = CharTokenizer()
        self.script = script
        self.calls = []

    def generate(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 stop=(STEP_END, ANSWER_CLOSE), want_values=False):
        self.calls.append({"prompts": len(prompts), "n": n, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "stop": tuple(stop),
                           "want_values": want_values})
        out = []
        for p in prompts:
            done = self.tokenizer.decode(p).split("\n", 1)[1]  # the prompt ends at its newline
            options = self.script(done, tuple(stop))
            samples = []
            for j in range(n):
                text, lp, finish, value = options[j % len(options)]
                if len(text) > max_new_tokens:
                    text, finish = text[:max_new_tokens], "length"
                samples.append(FakeCompletion(
                    tokens=[ord(ch) for ch in text], logprobs=[lp / len(text)] * len(text),
                    text=text, finish_reason=finish, value=value if want_values else None))
            out.append(samples)
        return out


A, B = "1+2=3" + STEP_END, "4*3=12" + STEP_END
ANSWER = "<answer>1+2+3+4</answer>"  # = 10 = target: dense reward 1.0


def hand_script(done, stop):
    """Root: A (logprob -1, V 0.5), B (-2, V -0.2). After A: the answer (-0.2), or a step (-1.2)."""
    if stop == (ANSWER_CLOSE,):  # rollout: (1+2)*3+4 = 13, reward 1 - 2 * 3/10 = 0.4
        return [("<answer>(1+2)*3+4</answer>", -0.7, "answer", None)]
    if done == "":
        return [(A, -1.0, "step", 0.5), (B, -2.0, "step", -0.2)]
    if done == A:
        return [(ANSWER, -0.2, "answer", 0.8), ("3+3=6" + STEP_END, -1.2, "step", 0.9)]
    return [("x" + STEP_END, -1.0, "step", 0.0)]


def endless_script(done, stop):
    """Four distinct equally likely steps at every depth, V 0.5; the rollout answers."""
    if stop == (ANSWER_CLOSE,):
        return [(ANSWER, -1.0, "answer", None)]
    d = done.count(STEP_END)
    return [(f"{i}+{d}={i + d}{STEP_END}", -2.0, "step", 0.5) for i in range(1, 5)]


def child(parent, N=0, W=0.0, prior=0.25, terminal=False, reward=None):
    node = Node(prior=prior, parent=parent, N=N, W=W, terminal=terminal, reward=reward,
                depth=parent.depth + 1)
    parent.children.append(node)
    return node


def all_nodes(root):
    return [root] + [n for c in root.children for n in all_nodes(c)]


# --- pUCT -----------------------------------------------------------------------------------

def test_puct_score_by_hand():
    # 0.5 + 0.5 * 0.3 * sqrt(4) / (1 + 1) = 0.65
    assert puct_score(0.5, 0.3, 4, 1, 0.5) == pytest.approx(0.65)
    # unvisited: 0 + 0.5 * 0.3 * sqrt(9) / 1 = 0.45
    assert puct_score(0.0, 0.3, 9, 0, 0.5) == pytest.approx(0.45)


def test_select_picks_hand_computed_child_and_virtual_loss_moves_the_next_worker():
    blog = MCTSConfig(virtual_value=0.0)  # the blog table's rule: virtual loss adds visits only
    root = Node(N=9, W=3.0)
    a = child(root, N=4, W=2.0, prior=0.2)  # 0.5 + 0.5*0.2*3/5 = 0.56 (root N + VL = 9 + 1 = 10)
    b = child(root, N=1, W=0.3, prior=0.5)
    c = child(root, N=0, prior=0.3)
    assert c.q == 0.0  # unvisited child: Q = 0 (author's code)
    # First worker, parent visits 9 + VL 1 = 10:
    #   a: 0.5 + 0.5*0.2*sqrt(10)/5 = 0.5632, b: 0.3 + 0.5*0.5*sqrt(10)/2 = 0.6953,
    #   c: 0 + 0.5*0.3*sqrt(10)/1 = 0.4743  -> b
    assert select_leaf(root, blog) == [root, b]
    assert (root.vloss, b.vloss, a.vloss) == (1, 1, 0)
    # Virtual loss counts as a visit of b: Q(b) = 0.3 / (1 + 1) = 0.15, N(b) + VL = 2.
    assert b.q == pytest.approx(0.15)
    # Second worker, parent visits 9 + 2 = 11:
    #   a: 0.5 + 0.1*sqrt(11)/5 = 0.5663, b: 0.15 + 0.25*sqrt(11)/3 = 0.4264,
    #   c: 0.15*sqrt(11) = 0.4975 -> a (without virtual loss b would win again: 0.6953 > 0.5632)
    assert puct_score(b.q, b.prior, 11, b.N + b.vloss, 0.5) == pytest.approx(0.4264, abs=1e-4)
    assert puct_score(a.q, a.prior, 11, a.N + a.vloss, 0.5) == pytest.approx(0.5663, abs=1e-4)
    assert select_leaf(root, blog) == [root, a]
    assert (root.vloss, a.vloss, b.vloss, c.vloss) == (2, 1, 1, 0)


def test_virtual_value_counts_each_virtual_visit_as_a_loss():
    cfg = MCTSConfig(virtual_value=-1.0)
    root = Node(N=3, W=0.3)
    b = child(root, N=1, W=0.3)
    path = select_leaf(root, cfg)
    assert path == [root, b] and b.q == pytest.approx((0.3 - 1) / (1 + 1))
    backup(path, 0.5, cfg)
    assert (b.N, b.W, b.vloss, b.vvalue) == (2, pytest.approx(0.8), 0, 0.0)
    assert root.q == pytest.approx(0.8 / 4)


def test_sixteen_workers_select_sixteen_distinct_leaves_and_virtual_loss_is_removed():
    root = Node(N=5, W=1.0)
    leaves = []
    for _ in range(4):
        mid = child(root, N=1, W=0.2, prior=0.25)
        leaves += [child(mid, prior=0.25) for _ in range(4)]
    cfg = MCTSConfig()
    paths = [select_leaf(root, cfg) for _ in range(16)]
    assert {id(p[-1]) for p in paths} == {id(leaf) for leaf in leaves}
    assert root.vloss == 16 and all(c.vloss == 4 for c in root.children)
    for p in paths:
        backup(p, 0.1, cfg)
    assert all(n.vloss == 0 for n in all_nodes(root))
    assert root.N == 5 + 16 and root.W == pytest.approx(1.0 + 1.6)
    assert all(c.N == 5 and c.W == pytest.approx(0.2 + 0.4) for c in root.children)


# --- expansion, evaluation --------------------------------------------------------------------

def completion(text, lp, finish="step", value=0.1):
    return FakeCompletion([ord(ch) for ch in text], [lp / len(text)] * len(text), text, finish,
                          value)


def test_priors_are_softmax_of_summed_logprobs():
    leaf = Node(value=0.0)
    comps = [completion("a" + STEP_END, -3.0), completion("bb" + STEP_END, -1.5),
             completion("c" + STEP_END, -7.25), completion("dd" + STEP_END, -0.5)]
    expand(leaf, comps, PROBLEM, MCTSConfig())
    z = math.exp(-3.0) + math.exp(-1.5) + math.exp(-7.25) + math.exp(-0.5)
    got = {c.text: c.prior for c in leaf.children}
    for c in comps:
        assert got[c.text] == pytest.approx(math.exp(sum(c.logprobs)) / z, rel=1e-12)
    assert [c.text[0] for c in leaf.children] == ["d", "b", "a", "c"]  # sorted by prior
    assert all(c.parent is leaf and c.depth == 1 and c.N == 0 for c in leaf.children)


def test_identical_siblings_merge_and_sum_their_priors():
    leaf = Node(value=0.0)
    comps = [completion("a" + STEP_END, -1.0), completion("b" + STEP_END, -2.0),
             completion("a" + STEP_END, -1.0), completion("c" + STEP_END, -2.0)]
    expand(leaf, comps, PROBLEM, MCTSConfig())
    z = 2 * math.exp(-1.0) + 2 * math.exp(-2.0)
    assert [c.text for c in leaf.children] == ["a" + STEP_END, "b" + STEP_END, "c" + STEP_END]
    assert leaf.children[0].prior == pytest.approx(2 * math.exp(-1.0) / z)
    assert sum(c.prior for c in leaf.children) == pytest.approx(1.0)


def test_terminal_detection_and_terminal_rewards():
    cfg = MCTSConfig(max_total_tokens=40)
    root = Node(value=0.0)
    leaf = child(root)
    leaf.text, leaf.length, leaf.value = A, len(A), 0.5
    comps = [completion("2+4=6" + STEP_END, -1.0, "step"),
             completion(ANSWER, -1.1, "answer"),
             completion("3*4=12<|im_end|>", -1.2, "eos"),
             completion("9" * 20, -1.3, "length"),
             completion("9*9=81" + STEP_END + "9" * 15, -1.4, "step")]  # 12 + 28 = 40: cap
    expand(leaf, comps, PROBLEM, cfg)
    by_text = {c.text: c for c in leaf.children}
    assert [by_text[c.text].terminal for c in comps] == [False, True, True, True, True]
    assert by_text[ANSWER].reward == 1.0  # A + ANSWER: (1+2+3+4) = 10 = target
    assert by_text["9" * 20].reward == -1.0  # no answer: format penalty
    assert by_text[comps[0].text].reward is None and by_text[comps[0].text].length == 24
    # evaluation: non-terminal -> V(s); terminal -> reward, or V(s) at test time
    assert evaluate(by_text[comps[0].text], cfg) == 0.1
    assert evaluate(by_text[ANSWER], cfg) == 1.0
    assert evaluate(by_text[ANSWER], MCTSConfig(terminal_value="value_head")) == 0.1
    with pytest.raises(ValueError, match="want_values"):
        expand(Node(), [completion("a" + STEP_END, -1.0, value=None)], PROBLEM, cfg)


# --- search with the scripted policy -----------------------------------------------------------

# After each of 4 sequential iterations (workers=1), by hand. Priors: A = e^-1/(e^-1+e^-2)
# = 0.7311, B = 0.2689; after A, ANSWER 0.7311, "3+3=6" 0.2689.
#  1: root is the leaf: expand, back up V(root) = 0             root N1 W0
#  2: root N+VL = 2: A 0.5*0.7311*sqrt2 = 0.517 > B 0.190: expand A, back up V(A) = 0.5
#                                                                root N2 W0.5, A N1 W0.5
#  3: root 3: A 0.5/2 + 0.3655*sqrt3/3 = 0.461 > B 0.1345*sqrt3 = 0.233; in A (N+VL 2):
#     ANSWER 0.517 > 0.190: terminal, back up its reward 1.0   root N3 W1.5, A N2 W1.5, ANS N1 W1
#  4: root 4: A 1.5/3 + 0.3655*2/3 = 0.744 > B 0.269; in A (3): ANSWER 1/2 + 0.3655*sqrt3/2
#     = 0.817 > 0.1345*sqrt3 = 0.233: ANSWER again, no expansion  root N4 W2.5, A N3 W2.5, ANS N2 W2
# Greedy selection: after 1 iteration it stops at the root, takes the best-evaluated sampled
# child A (V 0.5 > -0.2) and rolls out from it (+1 call); after 2 it stops at A, whose sampled
# children are ANSWER (reward 1.0) and "3+3=6" (V 0.9): ANSWER, no rollout.
@pytest.mark.parametrize("iterations,expected,calls", [
    (1, {"": (1, 0.0)}, 2),
    (2, {"": (2, 0.5), A: (1, 0.5)}, 2),
    (3, {"": (3, 1.5), A: (2, 1.5), ANSWER: (1, 1.0)}, 2),
    (4, {"": (4, 2.5), A: (3, 2.5), ANSWER: (2, 2.0)}, 2),
])
def test_backup_matches_hand_computed_visits_and_values(iterations, expected, calls):
    sampler = ScriptedSampler(hand_script)
    [res] = search([PROBLEM], sampler, MCTSConfig(workers=1, iterations=iterations, k=2))
    visited = {n.text: (n.N, n.W) for n in all_nodes(res.root) if n.N > 0}
    assert visited.keys() == expected.keys()
    for text, (n, w) in expected.items():
        assert visited[text][0] == n and visited[text][1] == pytest.approx(w)
    assert len(sampler.calls) == calls
    assert all(n.vloss == 0 for n in all_nodes(res.root))
    if iterations >= 2:
        assert res.text == A + ANSWER and res.reward == 1.0 and res.stats["from_rollout"] == 0
        assert res.stats["terminal_backups"] == max(iterations - 2, 0)
        assert res.stats["depth"] == 2 and res.path[-1].text == ANSWER


def test_a_collided_worker_waits_for_the_expansion_then_backs_up_its_leaf():
    # Round 1: both workers can only reach the root -> 1 expansion; the collided worker then
    #   backs up V(root) = 0 too: root N 2.
    # Round 2 (equal priors 0.5, virtual value -1): worker 1, root N+VL 3: A and B tie at
    #   0.25*sqrt3 -> A (first); worker 2, root 4: A (-1 + 0.25*2/2 = -0.75) < B (0.25*2 = 0.5)
    #   -> B. Both expanded in one call, backing up 0.5 and -0.2.
    def script(done, stop):
        if done == "":
            return [(A, -1.0, "step", 0.5), (B, -1.0, "step", -0.2)]
        return hand_script(done, stop)
    sampler = ScriptedSampler(script)
    [res] = search([PROBLEM], sampler, MCTSConfig(workers=2, iterations=2, k=2))
    assert res.stats["collisions"] == 1 and res.stats["expansions"] == 3
    assert [c["prompts"] for c in sampler.calls[:2]] == [1, 2]
    assert res.root.N == 4 == res.stats["selections"]  # every selection adds one visit
    assert res.root.W == pytest.approx(0 + 0 + 0.5 - 0.2)
    assert all(n.vloss == 0 for n in all_nodes(res.root))


def test_sixteen_workers_in_search_expand_sixteen_distinct_leaves_in_round_three():
    # M = 3 per worker = 3 rounds of 16 selections. Round 1: root + 15 collisions; round 2:
    # 4 children + 12 collisions; round 3: 16 leaves.
    sampler = ScriptedSampler(endless_script)
    [res] = search([PROBLEM], sampler, MCTSConfig(workers=16, iterations=3))
    assert [c["prompts"] for c in sampler.calls[:3]] == [1, 4, 16]
    assert res.stats["collisions"] == 15 + 12 and res.stats["expansions"] == 21
    assert res.root.N == 48 == res.stats["selections"]  # collided workers back up too
    assert all(n.vloss == 0 for n in all_nodes(res.root))


@pytest.mark.parametrize("workers", [1, 4, 16])
def test_one_sampler_call_per_round_for_all_workers_and_trees(workers):
    problems = [PROBLEM, Problem((2, 3, 5, 7), 24), Problem((1, 1, 13, 13), 26)]
    sampler = ScriptedSampler(endless_script)
    results = search(problems, sampler, MCTSConfig(workers=workers, iterations=16 // workers))
    *rounds, rollout = sampler.calls
    assert len(rounds) == 16 // workers  # M per worker = rounds
    assert all(c["n"] == 4 and c["want_values"] and c["stop"] == (STEP_END, ANSWER_CLOSE)
               for c in rounds)
    assert sum(c["prompts"] for c in rounds) == sum(r.stats["expansions"] for r in results)
    assert rollout["n"] == 1 and rollout["stop"] == (ANSWER_CLOSE,) and rollout["prompts"] == 3
    for r in results:
        assert r.root.N == 16 == r.stats["selections"]


def depth_script(d, options=((-1.0, 0.2),)):
    """Answers sit at depth d: d - 1 steps, one per (summed logprob, V) option given, then two
    answers (one right)."""
    def script(done, stop):
        depth = done.count(STEP_END)
        if stop == (ANSWER_CLOSE,) or depth == d - 1:
            return [(ANSWER, -1.0, "answer", 0.4), ("<answer>1</answer>", -1.0, "answer", 0.4)]
        return [(f"{i}+{depth}={i + depth}{STEP_END}", lp, "step", v)
                for i, (lp, v) in enumerate(options, 1)]
    return script


@pytest.mark.parametrize("d", [1, 2, 4, 6, 8])
def test_a_terminal_at_depth_d_is_backed_up_from_round_d_plus_1(d):
    # Round r expands nodes of depth <= r - 1, so their children (depth <= r) are selectable from
    # round r + 1: with M rounds an answer at depth d can be backed up only if M >= d + 1. On a
    # chain (the policy sure of every step) all 16 workers reach the answers in round d + 1.
    for rounds in (d, d + 1):
        [res] = search([PROBLEM], ScriptedSampler(depth_script(d)),
                       MCTSConfig(workers=16, iterations=rounds, k=2))
        assert res.stats["max_depth"] == min(rounds, d) and res.stats["expansions"] == d
        assert res.stats["terminal_backups"] == (16 if rounds == d + 1 else 0)
        # either way greedy ends on the right answer the tree already sampled: no rollout
        assert res.stats["from_rollout"] == 0 and res.reward == 1.0


def test_the_default_search_backs_up_answers_at_the_depths_models_produce():
    # tiny model: answers at depth 4 (three steps + the answer); a 1.5B instruct model: ~4-8
    # (the CPU default M = 12 reaches depth 11; --preset blog's M = 100 more)
    from train import BLOG_PRESET, Args
    cfg = MCTSConfig(workers=Args().mcts_workers, iterations=Args().mcts_iterations, k=4)
    # four distinct steps everywhere, with the unequal priors and values of a real policy
    options = ((-2.0, 0.5), (-3.0, 0.1), (-4.0, -0.2), (-5.0, -0.5))
    blog = dataclasses.replace(cfg, iterations=BLOG_PRESET["mcts_iterations"])
    for d, c in ((4, cfg), (6, cfg), (8, cfg), (8, blog)):
        [res] = search([PROBLEM], ScriptedSampler(depth_script(d, options)), c)
        assert res.stats["terminal_backups"] > 0 and res.stats["depth"] == d
        assert res.text.endswith(ANSWER) and res.stats["from_rollout"] == 0


def test_collisions_do_not_bias_visits_away_from_a_confident_branch():
    # Root: two steps of equal prior and equal value. Under "C" the policy is sure (its K samples
    # are identical, merged into one child: one leaf per depth, so parallel workers collide);
    # under "D" it is unsure (K distinct steps). Equal values everywhere, so a fair search visits
    # both about equally; if collided workers backed up nothing, "D" would take most visits.
    def script(done, stop):
        if stop == (ANSWER_CLOSE,):
            return [(ANSWER, -1.0, "answer", None)]
        if done == "":
            return [("C" + STEP_END, -1.0, "step", 0.3), ("D" + STEP_END, -1.0, "step", 0.3)]
        if done.startswith("C"):
            return [("c" + STEP_END, -0.5, "step", 0.3)]
        return [(f"d{i}{STEP_END}", -2.0, "step", 0.3) for i in range(4)]
    [res] = search([PROBLEM], ScriptedSampler(script), MCTSConfig(workers=16, iterations=8))
    confident, diverse = sorted(res.root.children, key=lambda n: n.text)
    assert confident.text.startswith("C") and len(confident.children) == 1
    assert confident.N + diverse.N == 16 * 7  # every selection after round 1 (the root)
    assert abs(confident.N - diverse.N) <= 0.1 * (confident.N + diverse.N)


def test_rollout_finishes_a_path_that_stops_at_a_non_terminal_node():
    # 1 iteration: the root expanded, its children unvisited -> greedy stops at the root and takes
    # the best-evaluated child, A (V 0.5 > B's -0.2), which is not terminal: rollout from A.
    sampler = ScriptedSampler(hand_script)
    [res] = search([PROBLEM], sampler, MCTSConfig(workers=1, iterations=1, k=2, temperature=0.7))
    rollout = "<answer>(1+2)*3+4</answer>"
    assert sampler.calls[-1] == {"prompts": 1, "n": 1, "max_new_tokens": 256 - len(A),
                                 "temperature": 0.7, "stop": (ANSWER_CLOSE,),
                                 "want_values": False}
    assert res.text == A + rollout and res.tokens == [ord(ch) for ch in A + rollout]
    assert res.logprobs == pytest.approx([-1.0 / len(A)] * len(A)
                                         + [-0.7 / len(rollout)] * len(rollout))
    assert res.reward == pytest.approx(0.4)  # 13 for 10: 1 - 2 * 3/10
    assert [n.text for n in res.path] == ["", A] and res.path[-1].value == 0.5
    assert res.stats["rollout_tokens"] == len(rollout) and res.stats["depth"] == 1
    assert res.stats["from_rollout"] == 1
    prompt = countdown.make_prompt(PROBLEM, sampler.tokenizer)
    assert res.prompt_ids == [ord(ch) for ch in prompt]


def test_total_length_cap_cuts_samples_in_a_shared_call():
    # Cap 20: A (12 tokens) and B (13) are expanded in one call with max_new_tokens 20 - 12 = 8;
    # B's children are cut to 20 - 13 = 7 tokens, become terminal with reward -1 and no value.
    def script(done, stop):
        if done == "":
            return [(A, -1.0, "step", 0.5), (B, -1.0, "step", -0.2)]
        return [(ANSWER, -1.0, "answer", 0.3)]
    sampler = ScriptedSampler(script)
    cfg = MCTSConfig(workers=2, iterations=4, k=2, max_total_tokens=20,
                     terminal_value="value_head")
    [res] = search([PROBLEM], sampler, cfg)
    assert sampler.calls[1]["max_new_tokens"] == 8
    a, b = sorted(res.root.children, key=lambda n: n.length)  # equal priors: order by length
    assert (a.text, b.text) == (A, B)
    assert [c.length for c in a.children + b.children] == [20, 20]
    cut = b.children[0]
    assert cut.text == ANSWER[:7] and cut.finish_reason == "length" and cut.value is None
    assert cut.terminal and evaluate(cut, cfg) == -1.0
    assert a.children[0].finish_reason == "length" and a.children[0].value == 0.3


# --- greedy selection ------------------------------------------------------------------------

def hand_tree():
    root = Node(N=12, W=4.8)
    a = child(root, N=5, W=1.0)  # Q 0.2
    a1 = child(a, N=5, W=1.0, terminal=True, reward=0.2)
    b = child(root, N=5, W=2.0)  # Q 0.4: ties a on N, wins on Q
    b1 = child(b, N=3, W=1.5, terminal=True, reward=0.5)
    b2 = child(b, N=2, W=0.5)
    b21 = child(b2)  # expanded, never visited
    b21.value = 0.3
    c = child(root, N=2, W=1.8)  # Q 0.9: best Q
    c1 = child(c, N=2, W=1.8, terminal=True, reward=0.9)
    d = child(root, terminal=True, reward=1.0)  # found in an expansion, never visited
    return root, a1, b, b1, b2, c, c1, d


def test_greedy_select_most_visited_q_and_best_reward():
    root, _, b, b1, b2, c, c1, d = hand_tree()
    assert greedy_select(root, MCTSConfig(select="visits")) == [root, b, b1]
    assert greedy_select(root, MCTSConfig(select="q")) == [root, c, c1]
    assert greedy_select(root, MCTSConfig(select="best_reward")) == [root, d]
    b1.N = 1  # now b2 (N 2) is the most visited; its only child was sampled, never visited
    assert greedy_select(root, MCTSConfig(select="visits")) == [root, b, b2, b2.children[0]]


def test_greedy_select_ends_on_the_best_sampled_answer_instead_of_a_rollout():
    # The greedy path stops at s (children never visited): of its sampled children, the answers
    # score by their reward (training) or V (test time), a step by V.
    root = Node(N=4, W=1.0)
    s = child(root, N=4, W=1.0)
    wrong = child(s, prior=0.5, terminal=True, reward=-0.4)
    right = child(s, prior=0.2, terminal=True, reward=1.0)
    step = child(s, prior=0.3)
    wrong.value, right.value, step.value = 0.6, 0.1, 0.5
    assert greedy_select(root, MCTSConfig()) == [root, s, right]
    assert greedy_select(root, MCTSConfig(terminal_value="value_head")) == [root, s, wrong]
    right.reward = wrong.reward = -1.0  # no good answer: the step V 0.5 wins, to be rolled out
    assert greedy_select(root, MCTSConfig()) == [root, s, step]


def test_tree_dict_is_json_and_config_errors_are_one_line():
    root = hand_tree()[0]
    tree = json.loads(json.dumps(search_tree_to_dict(root)))
    assert tree["N"] == 12 and tree["Q"] == pytest.approx(0.4)
    assert [c["N"] for c in tree["children"]] == [5, 5, 2, 0]
    assert tree["children"][3]["terminal"] and tree["children"][3]["reward"] == 1.0
    first = root.children[0]  # every field a tree picture reads, under its documented name
    assert {k: v for k, v in tree["children"][0].items() if k != "children"} == {
        "text": first.text, "prior": first.prior, "N": first.N, "Q": first.q,
        "terminal": first.terminal, "reward": first.reward, "value": first.value}
    with pytest.raises(ValueError, match="select must be one of"):
        search([PROBLEM], ScriptedSampler(hand_script), MCTSConfig(select="best"))


def test_token_budget_stops_the_search_before_a_worst_case_expansion_overruns_it():
    # endless_script: every step is 12 tokens ("1+0=1</step>"), 4 per expansion = 48 tokens;
    # worst case 4 * 16 = 64. Budget 224 keeps max_total_tokens = 64 for the rollout, so an
    # expansion starts only while used + 64 + 64 <= 224, i.e. used <= 96: at 0, 48 and 96.
    # The rollout (24 tokens) finishes the greedy path root -> c1 -> c1's first child.
    sampler = ScriptedSampler(endless_script)
    cfg = MCTSConfig(workers=1, iterations=100, k=4, max_step_tokens=16, max_total_tokens=64,
                     max_tree_tokens=224)
    [res] = search([PROBLEM], sampler, cfg)
    assert res.stats["expansions"] == 3 and res.stats["selections"] == 3
    assert res.stats["tokens_generated"] == 3 * 48 + len(ANSWER) == 168  # <= 224
    assert len(sampler.calls) == 4 and sampler.calls[-1]["stop"] == (ANSWER_CLOSE,)
    # 4 workers: round 1 expands the root (3 collide); round 2, worker 1 commits 48 + 64 = 112
    # tokens, then worker 2 finds 112 + 64 + 64 > 224: the tree's search is over.
    sampler = ScriptedSampler(endless_script)
    [res] = search([PROBLEM], sampler, dataclasses.replace(cfg, workers=4))
    assert res.stats["expansions"] == 2 and res.stats["collisions"] == 3
    assert res.stats["tokens_generated"] == 2 * 48 + len(ANSWER)
    assert all(n.vloss == 0 for n in all_nodes(res.root))
    # train.py's virtual value 0 (visits only): the shared root's virtual loss comes off in steps
    [res] = search([PROBLEM], ScriptedSampler(endless_script),
                   dataclasses.replace(cfg, workers=4, virtual_value=0.0))
    assert all(n.vloss == 0 and n.vvalue == 0.0 for n in all_nodes(res.root))
    for budget in range(128, 400, 7):  # never over budget
        [res] = search([PROBLEM], ScriptedSampler(endless_script),
                       dataclasses.replace(cfg, max_tree_tokens=budget))
        assert res.stats["tokens_generated"] <= budget
    with pytest.raises(ValueError, match="no room for one expansion"):
        search([PROBLEM], ScriptedSampler(endless_script),
               dataclasses.replace(cfg, max_tree_tokens=127))


# --- the real tiny model -------------------------------------------------------------------------

@pytest.mark.slow
def test_search_with_tiny_model_matches_teacher_forced_logprobs(tiny_sampler):
    import torch

    from losses import token_logprobs

    sampler, policy, tokenizer = tiny_sampler, tiny_sampler.policy, tiny_sampler.tokenizer
    cfg = MCTSConfig(workers=4, iterations=3, k=3, max_total_tokens=96)
    problems = countdown.make_splits(seed=0, n_train=0, n_test=2)[1]
    for problem, res in zip(problems, search(problems, sampler, cfg)):
        assert 0 < len(res.tokens) == len(res.logprobs) <= cfg.max_total_tokens
        assert res.text == tokenizer.decode(res.tokens, skip_special_tokens=True)
        assert res.reward == countdown.dense_reward(res.text, problem)
        assert res.root.N == cfg.workers * cfg.iterations
        ids = torch.tensor([res.prompt_ids + res.tokens])
        with torch.no_grad():
            logits, values = policy(ids)
        p = len(res.prompt_ids)
        ref = token_logprobs(logits[:, p - 1:-1], ids[:, p:])[0]
        assert torch.allclose(torch.tensor(res.logprobs), ref, atol=1e-4)
        for node in res.path[1:]:
            if node.value is not None:  # V(s) at the step's last token
                assert abs(node.value - values[0, p + node.length - 1].item()) < 1e-4


def test_answers_are_distinct_and_the_rollout_joins_only_when_it_is_new():
    """mcts.answers by hand on a built tree: root -> A -> {ANSWER (terminal), S (a step)}."""
    from mcts import Node, SearchResult, answers

    root = Node()
    a = Node(tokens=[1, 2], logprobs=[-0.5, -0.5], parent=root, N=3, depth=1, length=2)
    ans = Node(tokens=[3], logprobs=[-0.25], parent=a, N=2, terminal=True, reward=1.0, depth=2)
    step = Node(tokens=[4, 5], logprobs=[-1.0, -1.0], parent=a, N=1, depth=2)
    root.children, a.children = [a], [ans, step]

    def result(tokens, from_rollout):
        return SearchResult(prompt_ids=[9], tokens=tokens, logprobs=[-0.5] * len(tokens),
                            text="", reward=0.5, root=root, path=[root, a, step],
                            stats={"from_rollout": from_rollout, "rollout_tokens": 1})

    [only] = answers(result([1, 2, 3], from_rollout=0))
    assert (only.tokens, only.reward, only.visits, only.lengths) == ([1, 2, 3], 1.0, 2, [2, 1])
    assert only.steps == [a, ans] and only.logprobs == [-0.5, -0.5, -0.25]
    # a rollout that ended in the tree's own answer is not a second answer
    assert len(answers(result([1, 2, 3], from_rollout=1))) == 1
    # a new rollout answer from S: its steps, then the rollout as a step of its own
    new = answers(result([1, 2, 4, 5, 6], from_rollout=1))[1]
    assert (new.tokens, new.reward, new.visits, new.lengths) == ([1, 2, 4, 5, 6], 0.5, 1, [2, 2, 1])
    assert new.steps[:2] == [a, step] and len(new.steps) == 3
    # without a rollout the selected path ended in the tree: nothing to add
    assert len(answers(result([1, 2, 4, 5, 6], from_rollout=0))) == 1


def test_fit_cuts_a_sample_to_its_own_budget_as_a_length_stop():
    """Samples of one batch share max_new_tokens; each is cut to what its path has left: the
    tokens, their log-probs and text together, ended as a length stop (terminal) without V."""
    from mcts import _fit

    c = FakeCompletion(tokens=[49, 50, 51, 52], logprobs=[-1.0, -2.0, -3.0, -4.0], text="1234",
                       finish_reason="step", value=0.5)
    assert _fit(c, 4, CharTokenizer()) is c
    cut = _fit(c, 2, CharTokenizer())
    assert (cut.tokens, cut.logprobs, cut.text, cut.finish_reason, cut.value) == (
        [49, 50], [-1.0, -2.0], "12", "length", None)
