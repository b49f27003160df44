"""TreePO (Li et al. 2025, m-a-p): segment-level tree sampling and the tree-based advantage.

Instead of w i.i.d. samples per prompt, a prompt grows a tree: every path generates one
*segment* of at most L tokens per round, branches b ways, and stops early on the answer tag,
EOS or repetition; the tree never holds more than w trajectories (the group size). Paths that
share a segment share its prefix (and its KV: each distinct context is encoded once per call).
The advantage of a trajectory averages "reward minus subgroup mean" over the subgroups of
trajectories that share each of its ancestor segments, then the whole batch is whitened as in
REINFORCE++. Our copy of the paper loses the equations; the readings below follow the paper's
text and its public code (multimodal-art-projection/TreePO: recipe/treepo/vllm_rollout_tree.py,
`generate_sequences_tree_deepth_first_vanilla_mode`, fixed_avg / by_final_trajectory / random
fallback; verl/trainer/ppo/core_algos.py, `compute_tree_reinforce_plus_plus_baseline_outcome_advantage`
with adv_weight_strategy="average", the setting of run_treepo_train.sh).

Interpretation choices (the README links here):
- Segments are fixed token counts (max_new_tokens=L, stop only on `</answer>`/EOS), so sibling
  paths stay token-aligned (the paper's section 4.2: misaligned fallback hurts). Round 1 forks
  the prompt b ways (the paper's "Fixed Init Divergence").
- Early stop: `</answer>` or EOS ends a path; so does reaching depth d ("max_depth"), and
  repetition: some substring of `repetition_len` characters occurring `repetition_count` times.
  The paper checks 32 characters x 8 in the new 512-token segment; our segments are 16 tokens,
  so a loop spans segments and we check the whole path's text with 8 characters x 4.
- Branching-budget transfer (code: by_final_trajectory + fixed_avg): after a round, a prompt
  with S surviving paths, f paths that stopped in this round and F finished trajectories in all
  gives its survivors min(w - F, b * (S + f)) branches, spread evenly, the remainder one each to
  the first survivors (round-robin). A stopped path thus hands its b branches to the survivors,
  and finished + in-flight never exceeds w.
- Depth-first-search fallback: only when a prompt has no surviving path and F < w. Candidates are
  its trajectories that ended with `</answer>` or EOS (all trajectories if none did); in random
  order (cycling), each candidate picks a uniformly random segment boundary on its path (depth
  0 = the prompt itself .. its parent segment) and that node forks min(b, budget left) new
  branches, until w - F branches are in flight. Unlike the public code, which truncates tokens
  but keeps the old leaf's id, the new branches are children of the real node, so subgroups
  follow the true shared prefix. Every branch ends within d segments and none is dropped, so
  each prompt ends with exactly w trajectories: no attempt cap is needed.
- One sampler call per round for all prompts (expansions and fallbacks mixed): a node forking
  k ways is passed as k copies of its context with n=1 (branch counts differ between nodes);
  the sampler encodes each distinct context once and fans it out, the same as n=k.
- Tree-based advantage (paper eq. 5, code "average"): subgroups of trajectory i are the root
  group (all w trajectories of its prompt, always counted) and every ancestor segment shared
  by >= 2 trajectories (singleton subgroups carry no relative signal and are skipped, as in the
  code); A_i = mean over those subgroups of (r_i - subgroup mean reward). Then global
  normalisation over all tokens of the batch (verl masked_whiten, as REINFORCE++): subtract the
  token-weighted mean, divide by sqrt(unbiased token variance + 1e-8). The advantage is constant
  over a trajectory's tokens.
- DAPO dynamic sampling (when enabled): groups whose sparse (0/1) rewards are all equal are
  dropped before the normalisation (DAPO's filter on accuracy); the caller samples more prompts
  if it needs a full batch. The reward entering the advantage is dense (project default) or
  sparse (the paper's verifiable 0/1 reward).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import countdown
from countdown import ANSWER_CLOSE

ENDED = ("answer", "eos")  # sampler finish reasons that end a path (see Completion.finish_reason)


@dataclass
class TreePOConfig:
    """Tree knobs; defaults fit the tiny char-level model (completions ~40-60 tokens, 96 max)."""

    segment_len: int = 16  # L: max tokens per segment (paper: 512, with d = 14 for 7k tokens)
    max_depth: int = 6  # d: max segments per trajectory (L * d = 96 = train.py max_new_tokens)
    branch: int = 2  # b: forks per node and round (paper: 2, a binary tree without early stops)
    width: int = 16  # w: trajectories per prompt = the group size (paper: 16)
    temperature: float = 1.0  # sampling temperature (paper: 1.0); logprobs are the raw policy's
    top_p: float = 1.0  # nucleus sampling (paper: 1.0)
    repetition_len: int = 8  # early stop: a substring of this many characters ...
    repetition_count: int = 4  # ... occurring this many times in the path (paper: 32 x 8)
    dynamic_sampling: bool = False  # DAPO: drop prompts whose group is all correct or all wrong
    reward: str = "dense"  # reward in the advantage: "dense" (project) or "sparse" (paper, 0/1)
    seed: int = 0  # fallback choices (node and boundary)

    def __post_init__(self):
        if min(self.segment_len, self.max_depth, self.branch, self.width) < 1:
            raise ValueError(f"TreePOConfig: segment_len, max_depth, branch and width must be >= 1, "
                             f"got {self.segment_len}, {self.max_depth}, {self.branch}, {self.width}")
        if self.reward not in ("dense", "sparse"):
            raise ValueError(f"TreePOConfig.reward must be 'dense' or 'sparse', got {self.reward!r}")
        if self.repetition_len < 1 or self.repetition_count < 2:
            raise ValueError("TreePOConfig: repetition_len must be >= 1 and repetition_count >= 2")


@dataclass(eq=False)  # nodes are compared and hashed by identity: they key the subgroups
class Segment:
    """A tree node: one generated segment (the root is the prompt, with no tokens)."""

    parent: Segment | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None  # why the path ended here: answer, eos, repetition, max_depth
    children: list[Segment] = field(default_factory=list)
    depth: int = 0

    def path(self) -> list[Segment]:
        """Root first, self last."""
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass(eq=False)
class Tree:
    """One prompt's tree: finished trajectories are its leaves, in the order they ended."""

    problem: countdown.Problem
    prompt_ids: list[int]
    root: Segment = field(default_factory=lambda: Segment(None))
    leaves: list[Segment] = field(default_factory=list)
    fallbacks: int = 0  # rounds in which the depth-first-search fallback fired


def completion_tokens(node: Segment) -> list[int]:
    return [t for seg in node.path() for t in seg.tokens]


def has_repetition(text: str, length: int, count: int) -> bool:
    """Early stop on a loop: some `length`-character substring occurs `count` times (overlaps
    count, as in the paper's code)."""
    seen: dict[str, int] = defaultdict(int)
    for i in range(len(text) - length + 1):
        seen[text[i:i + length]] += 1
        if seen[text[i:i + length]] >= count:
            return True
    return False


def early_stop(node: Segment, finish_reason: str, cfg: TreePOConfig) -> str | None:
    """Why the path ending at this fresh segment stops (None: it goes one segment deeper)."""
    if finish_reason in ENDED:
        return finish_reason
    if has_repetition("".join(s.text for s in node.path()), cfg.repetition_len,
                      cfg.repetition_count):
        return "repetition"
    return "max_depth" if node.depth >= cfg.max_depth else None


def branching_budget(survivors: int, stopped_now: int, finished: int, cfg: TreePOConfig
                     ) -> list[int]:
    """Branching-budget transfer: survivors share b branches per path alive at this round's
    start (the stopped ones' too), capped by the width left; even split, remainder round-robin."""
    total = min(cfg.width - finished, cfg.branch * (survivors + stopped_now))
    base, extra = divmod(total, survivors)
    return [base + (i < extra) for i in range(survivors)]


def fallback_branches(tree: Tree, cfg: TreePOConfig, rng: random.Random) -> list[Segment]:
    """Depth-first-search fallback: nodes to fork (one entry per branch) for a prompt with no
    surviving path and fewer than w trajectories; random segment boundaries of answered paths."""
    candidates = [leaf for leaf in tree.leaves if leaf.finish in ENDED] or list(tree.leaves)
    rng.shuffle(candidates)
    budget, forks, i = cfg.width - len(tree.leaves), [], 0
    while budget > 0:
        leaf = candidates[i % len(candidates)]
        node = leaf.path()[rng.randrange(leaf.depth)]  # depth 0 (prompt) .. leaf's parent
        k = min(cfg.branch, budget)
        forks += [node] * k
        budget, i = budget - k, i + 1
    tree.fallbacks += 1
    return forks


def segment_tree_sampling(problems: Sequence[countdown.Problem], sampler, cfg: TreePOConfig
                          ) -> tuple[list[Tree], int]:
    """Grow one tree per problem, one sampler call per round for all of them -> (trees, calls)."""
    rng = random.Random(cfg.seed)
    trees = [Tree(p, countdown.prompt_ids(p, sampler.tokenizer)) for p in problems]
    # pending: (tree, node to fork), one entry per branch; round 1 forks each prompt b ways
    pending = [(t, t.root) for t in trees for _ in range(min(cfg.branch, cfg.width))]
    calls = 0
    while pending:
        contexts = [tree.prompt_ids + completion_tokens(node) for tree, node in pending]
        outs = sampler.generate(contexts, n=1, max_new_tokens=cfg.segment_len,
                                temperature=cfg.temperature, top_p=cfg.top_p, stop=(ANSWER_CLOSE,))
        calls += 1
        survivors: dict[int, list[Segment]] = defaultdict(list)
        stopped: dict[int, int] = defaultdict(int)
        for (tree, parent), (c,) in zip(pending, outs, strict=True):
            child = Segment(parent, c.tokens, c.logprobs, c.text, depth=parent.depth + 1)
            parent.children.append(child)
            child.finish = early_stop(child, c.finish_reason, cfg)
            if child.finish is None:
                survivors[id(tree)].append(child)
            else:
                tree.leaves.append(child)
                stopped[id(tree)] += 1
        pending = []
        for tree in trees:
            alive = survivors[id(tree)]
            if alive:
                counts = branching_budget(len(alive), stopped[id(tree)], len(tree.leaves), cfg)
                pending += [(tree, node) for node, k in zip(alive, counts) for _ in range(k)]
            elif len(tree.leaves) < cfg.width:
                pending += [(tree, node) for node in fallback_branches(tree, cfg, rng)]
    return trees, calls


def tree_advantages(paths: Sequence[Sequence[Hashable]], rewards: Sequence[float],
                    lengths: Sequence[int] | None = None, eps: float = 1e-8) -> list[float]:
    """TreePO advantage (paper eq. 5): mean over a trajectory's subgroups of reward minus the
    subgroup mean, then whitened over all tokens of the batch (REINFORCE++ global normalisation).

    paths[i] = (root, segment_1, ..., leaf) node ids of trajectory i, the root identifying its
    prompt; trajectories sharing paths[i][:k+1] form the subgroup of that depth-k node. The root
    group always counts; deeper subgroups only with >= 2 members. lengths[i] = token count of
    trajectory i (the whitening weight; None weighs trajectories equally).
    """
    if len(paths) != len(rewards) or (lengths is not None and len(lengths) != len(paths)):
        raise ValueError("tree_advantages: paths, rewards and lengths must have the same length")
    if any(len(p) < 1 for p in paths):
        raise ValueError("tree_advantages: every path needs at least its root")
    members: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        for k in range(len(p)):
            members[tuple(p[:k + 1])].append(i)
    raw = []
    for i, p in enumerate(paths):
        relative = []
        for k in range(len(p)):
            group = members[tuple(p[:k + 1])]
            if k == 0 or len(group) > 1:
                relative.append(rewards[i] - sum(rewards[j] for j in group) / len(group))
        raw.append(sum(relative) / len(relative))
    weights = [1] * len(raw) if lengths is None else list(lengths)
    n = sum(weights)
    if n == 0:
        return [0.0] * len(raw)
    mean = sum(w * a for w, a in zip(weights, raw)) / n
    var = sum(w * (a - mean) ** 2 for w, a in zip(weights, raw)) / max(n - 1, 1)
    return [(a - mean) / (var + eps) ** 0.5 for a in raw]


def dynamic_sampling(correct: list[list[float]]) -> list[int]:
    """DAPO dynamic sampling: indices of the trees to keep, i.e. whose trajectories are not all
    correct or all wrong (no relative signal)."""
    return [i for i, c in enumerate(correct) if min(c) != max(c)]


def treepo_rollouts(problems: Sequence[countdown.Problem], sampler, cfg: TreePOConfig
                    ) -> list[dict]:
    """TreePO's training data: w tree-sampled trajectories per problem with tree advantages.

    One dict per trajectory: prompt_ids, tokens, old_logprobs (raw policy, concatenated over
    segments), reward (dense), advantage (scalar) and advantages (per token, constant), group
    (problem index), finish, n_segments, and stats: one dict for the whole call, shared by all of
    its trajectories (read it once): trajectories, tokens_generated, forward_tokens,
    sampler_calls, fallbacks, dropped_groups.
    """
    if not problems:
        raise ValueError("treepo_rollouts needs at least one problem")
    gen0, fwd0 = sampler.tokens_generated, sampler.forward_tokens
    trees, calls = segment_tree_sampling(problems, sampler, cfg)
    texts = sampler.tokenizer.batch_decode([completion_tokens(leaf) for t in trees for leaf in t.leaves],
                                           skip_special_tokens=True)
    texts_by_tree, pos = [], 0
    for t in trees:
        texts_by_tree.append(texts[pos:pos + len(t.leaves)])
        pos += len(t.leaves)
    dense = [[countdown.dense_reward(x, t.problem) for x in xs] for t, xs in zip(trees, texts_by_tree)]
    sparse = [[countdown.sparse_reward(x, t.problem) for x in xs] for t, xs in zip(trees, texts_by_tree)]
    keep = dynamic_sampling(sparse) if cfg.dynamic_sampling else list(range(len(trees)))
    stats = {"trajectories": sum(len(t.leaves) for t in trees),
             "tokens_generated": sampler.tokens_generated - gen0,
             "forward_tokens": sampler.forward_tokens - fwd0, "sampler_calls": calls,
             "fallbacks": sum(t.fallbacks for t in trees), "dropped_groups": len(trees) - len(keep)}
    used = dense if cfg.reward == "dense" else sparse
    items = [(g, leaf, j) for g in keep for j, leaf in enumerate(trees[g].leaves)]
    tokens = [completion_tokens(leaf) for _, leaf, _ in items]
    adv = tree_advantages([leaf.path() for _, leaf, _ in items],
                          [used[g][j] for g, _, j in items], [len(x) for x in tokens])
    return [{"prompt_ids": trees[g].prompt_ids, "tokens": toks,
             "old_logprobs": [lp for seg in leaf.path() for lp in seg.logprobs],
             "reward": dense[g][j], "advantage": a, "advantages": [a] * len(toks), "group": g,
             "finish": leaf.finish, "n_segments": leaf.depth, "stats": stats}
            for (g, leaf, j), toks, a in zip(items, tokens, adv)]
