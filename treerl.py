"""TreeRL (Hou et al., 2025, THUDM): on-policy RL over EPTree rollouts with process rewards.

EPTree ("entropy-guided tree search"): sample M i.i.d. responses per prompt; in each of L
iterations pick, in every response tree, the N tokens with the highest entropy H(y_t) = -log
pi(y_t | x, y_<t) as forking points and sample T new branches from each. The finished tree gives
every step s_n a Monte Carlo value V(s_n) (fraction of correct leaves below it) and a process
reward (GA + LA) / sqrt(|L(s_n)|): global advantage V(s_n) - V(root) plus local advantage
V(s_n) - V(parent), re-weighted by the leaves sharing the step. Each root-to-leaf path is one
training sequence whose tokens carry their step's reward.

Interpretation choices (read from the paper's code, github.com/THUDM/TreeRL,
`entropy_chain_local_manager.py` and `tree_node.py`; the README links here):
- Forking: a branch re-samples the forking token itself. Its prompt is the prefix BEFORE the
  forking token (code: `get_prefix_ids(split_idx)` = tokens[:split_idx]), so the forking point
  ends a step and the original token and the T new ones are siblings.
- N forking points per TREE per iteration (a tree = one of the M initial responses with all its
  branches), chosen as the top-N of -logp over the tree's tokens (code: per-node top-N, then the
  tree's top-N). So a prompt ends with at most M * (1 + N*T*L) leaves: 6 * (1 + 2*2*1) = 30 with
  the paper's defaults, the paper's "30 sequences per prompt".
- Not forking points: the first token of a response (forking there is a fresh i.i.d. sample from
  the prompt, or a position already forked: each position is forked at most once, so L > 1
  explores new points; the paper's code can pick a position again), the last token of a response
  (a branch would differ in one token only), and the tokens after `<answer>` (the code masks
  every token after the first one containing "answer"). Ties in -logp: earlier in the tree
  (depth-first, original response before its branches) and earlier position first.
- All branches of all prompts of one iteration are ONE sampler call (prompt + prefix, n=T each:
  the sampler encodes each prefix once and fans it out). A whole completion stays within
  max_new_tokens: the call runs to max_new_tokens minus the shortest prefix and each branch is cut
  at its own remaining budget (finish_reason "length"; the cut tokens still count as generated).
- V(root) is the mean over all leaves of the prompt (the M trees hang below one root: the
  prompt), so first-level steps have GA = LA. The reward is the sparse one (1 correct / 0, the
  paper's verifier) unless cfg.reward == "dense" (V = mean dense reward of the leaves). train.py
  passes --tree-reward, dense by default: trained on 0/1, a malformed answer is worth a wrong one
  and the tiny model lost its format (98% -> 88%) and its accuracy (figures/README.md, sparse
  vs dense).
- The re-weighting divides (GA + LA) of every step by sqrt(|L(s_n)|); a leaf step has |L| = 1, so
  only shared steps change (paper: "dividing the square root of the number of leaf nodes"). As in
  the paper, every leaf is emitted as a full sequence, so a shared step's tokens appear in |L(s_n)|
  sequences: the 1/sqrt re-weighting is the paper's answer to that repetition (total weight
  sqrt(|L|) * (GA + LA) instead of |L| * (GA + LA)); we do not de-duplicate further.
  The paper's code has further variants (leave-one-out leaf baselines, token-mean normalisation);
  we implement the paper's equations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import countdown
from countdown import ANSWER_CLOSE, ANSWER_OPEN

REWARDS = ("sparse", "dense")


@dataclass
class TreeRLConfig:
    """EPTree knobs; M, N, L, T default to the paper's (6, 2, 1, 2)."""

    M: int = 6  # initial i.i.d. responses per prompt, each the root of a tree
    N: int = 2  # forking points per tree per iteration (top-N entropy tokens)
    L: int = 1  # expansion iterations
    T: int = 2  # new branches sampled from each forking point
    temperature: float = 1.0  # paper: 1.2 with top-p 0.95; 1.0 samples the raw policy as the
    top_p: float = 1.0  #        other methods here do (entropies always use the raw logprobs)
    max_new_tokens: int = 128  # cap on a whole completion (root to leaf)
    reward: str = "sparse"  # leaf reward for V(s_n): "sparse" (fraction correct, paper) or "dense"


@dataclass(eq=False)
class Segment:
    """A step of the tree: the tokens between two forking points (or a response's end).
    The root is the prompt (no tokens); a leaf holds the outcome reward of its root-to-leaf path."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forkable: list[bool] = field(default_factory=list)  # may this position be a forking point?
    children: list[Segment] = field(default_factory=list)
    reward: float | None = None  # leaves: reward of the whole completion (cfg.reward)
    finish_reason: str = ""


def _check(cfg: TreeRLConfig) -> None:
    if min(cfg.M, cfg.N, cfg.T) < 1 or cfg.L < 0 or cfg.max_new_tokens < 2:
        raise ValueError(f"TreeRLConfig needs M, N, T >= 1, L >= 0, max_new_tokens >= 2: {cfg}")
    if cfg.reward not in REWARDS:
        raise ValueError(f"unknown TreeRL reward {cfg.reward!r}; expected one of {REWARDS}")


def forkable_positions(tokens: list[int], tokenizer) -> list[bool]:
    """Positions of one new response that may become forking points: not its first token, not
    its last, nothing after the token that completes `<answer>` (the paper masks the answer)."""
    ok = [0 < i < len(tokens) - 1 for i in range(len(tokens))]
    text = ""
    for i, piece in enumerate(tokenizer.batch_decode([[t] for t in tokens])):
        text += piece
        if ANSWER_OPEN in text:
            ok[i + 1:] = [False] * (len(tokens) - i - 1)
            break
    return ok


def walk(segment: Segment, prefix: tuple[int, ...] = ()):
    """Depth-first (segment, tokens before it) pairs, a segment before its children."""
    yield segment, prefix
    for child in segment.children:
        yield from walk(child, prefix + tuple(segment.tokens))


def forking_points(tree: Segment, n: int) -> list[tuple[Segment, int, list[int]]]:
    """EPTree's Top-N: the n forkable tokens of one response tree with the highest entropy
    -log pi(y_t); -> (segment, position, completion prefix before the forking token)."""
    candidates = [(lp, order, seg, i, prefix)
                  for order, (seg, prefix) in enumerate(walk(tree))
                  for i, (lp, ok) in enumerate(zip(seg.logprobs, seg.forkable)) if ok]
    # lowest logprob = highest entropy first; ties: earlier segment, then earlier position (stable)
    candidates.sort(key=lambda c: c[:2])
    return [(seg, i, [*prefix, *seg.tokens[:i]]) for _, _, seg, i, prefix in candidates[:n]]


def fork(segment: Segment, index: int, branches: list[Segment]) -> None:
    """Split `segment` before `index`: its tail becomes one child (keeping the old children) and
    the branches its siblings. Several forks of one segment must come in decreasing index."""
    tail = Segment(segment.tokens[index:], segment.logprobs[index:],
                   [False] + segment.forkable[index + 1:], segment.children, segment.reward,
                   segment.finish_reason)
    segment.tokens, segment.logprobs = segment.tokens[:index], segment.logprobs[:index]
    segment.forkable, segment.reward, segment.finish_reason = segment.forkable[:index], None, ""
    segment.children = [tail, *branches]


def new_segment(completion, budget: int, tokenizer) -> Segment:
    """A sampled response (or branch) as a leaf segment, cut to `budget` tokens."""
    tokens, logprobs, reason = completion.tokens, completion.logprobs, completion.finish_reason
    if len(tokens) > budget:
        tokens, logprobs, reason = tokens[:budget], logprobs[:budget], "length"
    return Segment(list(tokens), list(logprobs), forkable_positions(tokens, tokenizer),
                   finish_reason=reason)


def eptree(problems: list, sampler, cfg: TreeRLConfig) -> tuple[list[Segment], list[list[int]], dict]:
    """Entropy-guided tree search for all problems at once: one sampler call for the M initial
    responses of every prompt, then one call per iteration for all branches of all prompts.
    -> (one root per problem, the prompts' token ids, counters)."""
    _check(cfg)
    tok = sampler.tokenizer
    prompts = [countdown.prompt_ids(p, tok) for p in problems]
    gen = {"temperature": cfg.temperature, "top_p": cfg.top_p, "stop": (ANSWER_CLOSE,)}
    stats = {"sampler_calls": 1, "forks": 0}
    outs = sampler.generate(prompts, n=cfg.M, max_new_tokens=cfg.max_new_tokens, **gen)
    roots = [Segment(children=[new_segment(c, cfg.max_new_tokens, tok) for c in group])
             for group in outs]
    for _ in range(cfg.L):
        tasks = [(p, seg, i, prefix) for p, root in enumerate(roots) for tree in root.children
                 for seg, i, prefix in forking_points(tree, cfg.N)]
        if not tasks:
            break
        shortest = min(len(prefix) for *_, prefix in tasks)
        outs = sampler.generate([prompts[p] + prefix for p, _, _, prefix in tasks], n=cfg.T,
                                max_new_tokens=cfg.max_new_tokens - shortest, **gen)
        stats["sampler_calls"] += 1
        stats["forks"] += len(tasks)
        # fork after sampling (the prefixes above were read from the unsplit tree), later
        # positions of a segment first so that earlier indices still point into it
        for (_, seg, i, prefix), group in sorted(zip(tasks, outs), key=lambda x: -x[0][2]):
            fork(seg, i, [new_segment(c, cfg.max_new_tokens - len(prefix), tok) for c in group])
    return roots, prompts, stats


def leaf_paths(root: Segment) -> list[list[Segment]]:
    """Every root-to-leaf path (root excluded), depth-first: one training sequence each."""
    if not root.children:
        return [[]]
    return [[child, *path] for child in root.children for path in leaf_paths(child)]


def monte_carlo_values(root: Segment) -> dict[Segment, tuple[float, int]]:
    """V(s_n) = mean reward of the leaves below s_n (fraction correct with the sparse reward),
    with |L(s_n)|, the number of those leaves, for every segment of the tree."""
    out: dict[Segment, tuple[float, int]] = {}

    def visit(seg: Segment) -> tuple[float, int]:
        if not seg.children:
            if seg.reward is None:
                raise ValueError("every leaf needs a reward before computing tree values")
            out[seg] = (seg.reward, 1)
            return out[seg]
        total = count = 0
        for child in seg.children:
            value, leaves = visit(child)
            total, count = total + value * leaves, count + leaves
        out[seg] = (total / count, count)
        return out[seg]

    visit(root)
    return out


def tree_advantages(root: Segment) -> dict[Segment, float]:
    """Process reward of every step: (GA + LA) / sqrt(|L(s_n)|) with GA = V(s_n) - V(root),
    LA = V(s_n) - V(parent(s_n)) (paper, Sec. 3.2)."""
    values = monte_carlo_values(root)
    v_root = values[root][0]
    out: dict[Segment, float] = {}
    for parent, _ in walk(root):
        for child in parent.children:
            value, leaves = values[child]
            out[child] = ((value - v_root) + (value - values[parent][0])) / math.sqrt(leaves)
    return out


def treerl_rollouts(problems: list, sampler, cfg: TreeRLConfig | None = None) -> list[dict]:
    """EPTree, leaf rewards, step advantages -> one dict per leaf: prompt_ids, tokens,
    old_logprobs, reward (dense, for logging), advantages (per token), group, text, stats."""
    cfg = cfg or TreeRLConfig()
    tok = sampler.tokenizer
    generated, forwarded = sampler.tokens_generated, sampler.forward_tokens
    roots, prompts, stats = eptree(problems, sampler, cfg)
    leaf_reward = countdown.sparse_reward if cfg.reward == "sparse" else countdown.dense_reward
    rows, most_leaves = [], 0
    for p, (problem, root) in enumerate(zip(problems, roots)):
        paths = leaf_paths(root)
        most_leaves = max(most_leaves, len(paths))
        texts = tok.batch_decode([[t for seg in path for t in seg.tokens] for path in paths],
                                 skip_special_tokens=True)
        for path, text in zip(paths, texts):
            path[-1].reward = leaf_reward(text, problem)
        advantages = tree_advantages(root)
        for path, text in zip(paths, texts):
            rows.append({
                "prompt_ids": list(prompts[p]),
                "tokens": [t for seg in path for t in seg.tokens],
                "old_logprobs": [lp for seg in path for lp in seg.logprobs],
                "reward": countdown.dense_reward(text, problem),
                "advantages": [advantages[seg] for seg in path for _ in seg.tokens],
                "group": p, "text": text, "finish_reason": path[-1].finish_reason})
    stats.update(trajectories=len(rows), problems=len(problems), max_leaves=most_leaves,
                 tokens_generated=sampler.tokens_generated - generated,
                 forward_tokens=sampler.forward_tokens - forwarded)
    for row in rows:
        row["stats"] = stats  # one dict for the whole call, shared by its trajectories
    return rows
