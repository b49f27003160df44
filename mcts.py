"""Parallel MCTS over reasoning steps (blog: "Monte Carlo Tree Search", "Trajectory Selection").

Each node is one reasoning step (tokens up to `</step>`, as in Tree-of-Thoughts). Expanding a
leaf samples K continuations from the policy; pUCT with priors from the softmax of the summed
step logprobs decides where to search; 16 workers share one tree and spread out with virtual
loss; after M iterations a greedy pass picks the trajectory that is distilled into the policy.

Interpretation choices (the README links here):
- M counts iterations per worker, as in the blog author's code (`at2005/llm-mcts`: every one of
  the 16 async workers of a tree runs its own loop of M selections, so a tree gets 16 x M). We
  run the workers in batched rounds: in round r every worker of every tree selects once, then all
  pending leaves of all trees are expanded in ONE sampler call; M rounds in all.
- Depth and rounds: a node created in round r can be selected at the earliest in round r + 1, so
  after R rounds the deepest expanded node sits at depth R - 1 and a terminal at depth d can have
  its reward backed up only if R >= d + 1. The tiny model answers at depth 4 (three steps and the
  answer), a 1.5B instruct model at ~4-8: the default M (train.py) leaves rounds to spare.
- Backup is AlphaZero's: a selected leaf is expanded (K children with priors) and the value of
  the leaf itself, V(s_leaf) from the value head, or its dense reward if terminal, is backed up
  with N += 1 along the path. Children get their V(s) in the same sampler call and it enters the
  statistics the first time the child is selected (unvisited children count with Q = 0, as in
  the author's code). The root's value is never compared, so it backs up 0.
- Collisions: a worker whose leaf is already pending in this round waits for that expansion,
  then backs up the leaf's value along its own path (the author's async workers do this). Every
  selection therefore adds one visit; if collided workers added none, branches whose samples
  agree (merged into one child, so more collisions) would lose visits to uncertain ones.
- Virtual loss is "value added to visit counts" (blog table, author's code): a selecting worker
  adds 1 to N of every node on its path, Q = W / (N + VL), removed on backup. The exploration
  term always drops. With visits alone Q is pulled towards 0, which repels from a branch with
  W > 0 but *draws* to one with W < 0 (most branches of a weak model), so workers collide. So
  by default each virtual visit also counts with value -1, the worst reward (classic virtual
  *loss*): Q = (W - VL) / (N + VL). `virtual_value=0` is the visits-only rule of the blog's
  table / the author's code.
- A selected terminal leaf needs no model call: its reward is backed up at once.
- Greedy selection (blog: "Trajectory Selection"): from the root follow the most-visited child
  (ties: higher Q) until a terminal node or a node whose children were never visited. The
  children of that last node are already sampled and evaluated (a terminal's reward, or V(s)),
  so the best-evaluated one is taken (ties: higher prior) rather than sampling anew; only if it
  is not terminal does one policy rollout finish the answer.
- c_puct: the blog's 0.5 here and in `--preset blog`; train.py's CPU default is 2.0: with its
  M = 12 (192 selections a tree; the author's code makes 1,600) a larger weight on the prior
  selects better trajectories (benchmarks/README.md, "c_puct").
- Token budget (`max_tree_tokens`, for equal-compute comparisons in eval.py): the search of a
  tree stops when the next expansion could overrun it, counting each expansion at its worst case
  (K samples of max_step_tokens) and keeping max_total_tokens for the final rollout.
- Identical sibling steps (same tokens) are merged into one child whose prior is the sum of
  their softmax shares: same prior mass as keeping both, without splitting the search between
  identical subtrees.
- Whole-tree distillation (beyond the blog; train.py --mcts-distill whole): the search is
  unchanged, but the trainer gets every distinct answer it produced (`answers`: each terminal,
  visited or not, and the selection's rollout answer if new), not one path: a tree samples many
  answers for the one it selects, and single-path distillation trains on a small share of the
  tokens it pays for. Credit comes from the tree's own answers, as in TreeRL (arXiv 2506.11902):
  leave-one-out (an answer minus the mean of the others, on every token) or TreeRL's step credit
  (a step's subtree mean against the root's and its parent's, over sqrt(answers below it)); both
  in losses.py; or `visits`: only the answers the search backed up, each weighted by its visit
  count (the search's distribution at the answer level, AlphaZero's kind of target) against the
  tree's mean reward. Not the root's visit distribution over its K = 4 children: with ~12
  rounds most children are visited once or never, the regime where Gumbel AlphaZero (ICLR 2022)
  shows visit-count targets fail to improve the policy. The answers are the policy's own
  samples (each step sampled at the recorded log-probs), only which prefixes were extended is
  the search's choice, so CISPO's ratio to pi_old applies as for any sample.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import countdown
from countdown import ANSWER_CLOSE, STEP_END

SELECT_MODES = ("visits", "q", "best_reward")
TERMINAL_VALUES = ("reward", "value_head")


@dataclass
class MCTSConfig:
    """Search knobs; defaults are the blog's table of values (workers, K, M, cpuct, virtual loss)."""

    workers: int = 16  # parallel agents sharing one tree (blog: "MCTS Workers (N agents)")
    iterations: int = 100  # M: selections per worker (author's code), one batched round each
    k: int = 4  # completions sampled per expanded leaf (blog: "Completions per Node (K)")
    c_puct: float = 0.5  # pUCT exploration coefficient (blog: "cpuct")
    virtual_loss: int = 1  # added to N along a selected path until backup (blog: "Virtual Loss")
    virtual_value: float = -1.0  # value each virtual visit counts with: -1 = classic "loss"
    #                              (default: few collisions when values are < 0); 0 = visits only
    temperature: float = 1.0  # sampling temperature; 1.0 samples the raw policy whose logprobs
    #                           we record (author's code: 0.8)
    max_step_tokens: int = 64  # cap on one step; a step cut there is terminal (author's code: 64)
    max_total_tokens: int = 256  # cap on a whole completion; a step reaching it is terminal
    select: str = "visits"  # trajectory: "visits" (most visited), "q" (highest Q), or
    #                         "best_reward" (best terminal reward in the tree: ground truth, training only)
    terminal_value: str = "reward"  # terminal evaluation: "reward" (dense reward, needs the target)
    #                                 or "value_head" (V(s) at the end: test-time search, no target)
    max_tree_tokens: int = 0  # token budget per tree (0: none): a leaf is expanded only while
    #   tokens generated + k * max_step_tokens + max_total_tokens (room for the final rollout)
    #   fits, so search + rollout never exceed it; the search of a tree ends when no expansion fits


@dataclass(eq=False)
class Node:
    """One reasoning step; the state is the prompt plus the steps from the root to here."""

    tokens: list[int] = field(default_factory=list)  # this step's tokens (empty at the root)
    logprobs: list[float] = field(default_factory=list)  # raw-policy log pi of those tokens
    text: str = ""  # decoded step
    prior: float = 1.0  # P(s, a): softmax of summed logprobs over the siblings
    parent: Node | None = field(default=None, repr=False)
    children: list[Node] = field(default_factory=list, repr=False)
    N: int = 0  # visit count
    W: float = 0.0  # sum of backed-up values
    vloss: int = 0  # virtual loss of the workers whose selection is in flight through here
    vvalue: float = 0.0  # their virtual value (MCTSConfig.virtual_value per unit of vloss)
    terminal: bool = False  # answer closed, EOS, or a length cap
    finish_reason: str = ""  # the sampler's: "step", "answer", "eos" or "length"
    reward: float | None = None  # dense reward of the completion ending here (terminal nodes)
    value: float | None = None  # V(s) from the value head at the end of this step
    length: int = 0  # completion tokens from the root to the end of this step
    depth: int = 0  # steps from the root

    @property
    def q(self) -> float:
        """Mean value with virtual loss counted as visits; 0 for an unvisited node."""
        n = self.N + self.vloss
        return (self.W + self.vvalue) / n if n else 0.0

    def path(self) -> list[Node]:
        """Nodes from the root to this one."""
        nodes = [self]
        while nodes[-1].parent is not None:
            nodes.append(nodes[-1].parent)
        return nodes[::-1]


@dataclass
class SearchResult:
    """The selected trajectory (what the trainer needs) and the search that found it."""

    prompt_ids: list[int]
    tokens: list[int]  # completion: the steps on the selected path, then the rollout if any
    logprobs: list[float]  # per-token log pi_old under the raw sampling policy
    text: str
    reward: float  # dense reward of `text` (computed after the search, for training/logging)
    stats: dict
    root: Node = field(repr=False)
    path: list[Node] = field(default_factory=list, repr=False)  # the selected nodes, root first


def puct_score(q: float, prior: float, parent_visits: float, child_visits: float,
               c_puct: float) -> float:
    """pUCT (AlphaZero), not UCT: the policy's prior steers exploration, which the blog credits."""
    return q + c_puct * prior * math.sqrt(parent_visits) / (1 + child_visits)


def select_leaf(root: Node, cfg: MCTSConfig) -> list[Node]:
    """Descend by pUCT to a leaf, adding virtual loss along the path so parallel workers diverge."""
    path = [root]
    _add_virtual_loss(root, cfg)
    while path[-1].children:
        parent_visits = path[-1].N + path[-1].vloss
        path.append(max(path[-1].children, key=lambda c: puct_score(
            c.q, c.prior, parent_visits, c.N + c.vloss, cfg.c_puct)))
        _add_virtual_loss(path[-1], cfg)
    return path


def _add_virtual_loss(node: Node, cfg: MCTSConfig) -> None:
    node.vloss += cfg.virtual_loss
    node.vvalue += cfg.virtual_loss * cfg.virtual_value


def _remove_virtual_loss(path: list[Node], cfg: MCTSConfig) -> None:
    for node in path:
        node.vloss -= cfg.virtual_loss
        node.vvalue = node.vvalue - cfg.virtual_loss * cfg.virtual_value if node.vloss else 0.0


def expand(leaf: Node, completions: list, problem: countdown.Problem, cfg: MCTSConfig) -> None:
    """The K sampled steps become the leaf's children (its action space); priors = softmax of
    summed logprobs ("raw cumulative sequence probabilities become vanishingly tiny")."""
    sums = [sum(c.logprobs) for c in completions]
    top = max(sums)
    weights = [math.exp(s - top) for s in sums]
    total = sum(weights)
    prefix = "".join(n.text for n in leaf.path())
    children: dict[tuple[int, ...], Node] = {}
    for c, w in zip(completions, weights):
        key = tuple(c.tokens)
        if key in children:  # identical sibling: merge, summing the prior mass
            children[key].prior += w / total
            continue
        length = leaf.length + len(c.tokens)
        terminal = c.finish_reason != "step" or length >= cfg.max_total_tokens
        if not terminal and c.value is None:
            raise ValueError("expand needs Completion.value (sampler.generate(want_values=True))")
        children[key] = Node(
            tokens=list(c.tokens), logprobs=list(c.logprobs), text=c.text, prior=w / total,
            parent=leaf, terminal=terminal, finish_reason=c.finish_reason, value=c.value,
            reward=countdown.dense_reward(prefix + c.text, problem) if terminal else None,
            length=length, depth=leaf.depth + 1)
    leaf.children = sorted(children.values(), key=lambda n: -n.prior)  # ties keep sample order


def evaluate(node: Node, cfg: MCTSConfig) -> float:
    """Terminal: the dense reward (or, at test time, the value head); otherwise V(s) in (-1, 1)."""
    if node.terminal and (cfg.terminal_value == "reward" or node.value is None):
        # value is None only for a step cut by the total length cap: no closed answer, so its
        # reward is the format penalty -1 whatever the target (no ground truth used).
        return node.reward
    return node.value


def backup(path: list[Node], value: float, cfg: MCTSConfig) -> None:
    """N += 1 and W += value from the root to the evaluated leaf; the worker's virtual loss goes."""
    _remove_virtual_loss(path, cfg)
    for node in path:
        node.N += 1
        node.W += value


def _nodes(root: Node) -> list[Node]:
    stack, out = [root], []
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def terminals(root: Node) -> list[Node]:
    """Every answer the search sampled (merged duplicates once), visited or not."""
    return [n for n in _nodes(root) if n.terminal]


@dataclass
class Answer:
    """One complete answer the search produced, with the steps it is made of (whole-tree
    distillation trains on every one: train.whole_tree_trajectories)."""

    tokens: list[int]
    logprobs: list[float]
    reward: float  # dense reward of the whole completion
    steps: list  # the tree nodes from the first step to the last (root excluded); a rollout that
    #              finished the selected path is one more step, named "rollout"
    lengths: list[int]  # tokens of each step
    visits: int  # N of its last tree node: how often the search backed up through this answer
    #              (for the rollout answer, through the node the rollout finished)


def answers(result: SearchResult) -> list[Answer]:
    """Every distinct completion a search produced: each terminal of the tree, visited or not
    (merged siblings once), and the selected path's rollout answer when it is a new one."""
    out, seen = [], set()
    for node in terminals(result.root):
        steps = node.path()[1:]
        out.append(Answer(tokens=path_tokens(node),
                          logprobs=[x for n in steps for x in n.logprobs], reward=node.reward,
                          steps=steps, lengths=[len(n.tokens) for n in steps], visits=node.N))
        seen.add(tuple(out[-1].tokens))
    if result.stats["from_rollout"] and tuple(result.tokens) not in seen:
        steps = result.path[1:]
        out.append(Answer(tokens=list(result.tokens), logprobs=list(result.logprobs),
                          reward=result.reward, steps=[*steps, "rollout"],
                          lengths=[len(n.tokens) for n in steps] + [result.stats["rollout_tokens"]],
                          visits=result.path[-1].N))
    return out


def greedy_select(root: Node, cfg: MCTSConfig) -> list[Node]:
    """Blog's greedy selection after search: from the root, take the most-visited child (ties ->
    higher Q) until a terminal node or a node whose children were never visited; then, of that
    node's sampled children, the best-evaluated one (ties -> higher prior)."""
    if cfg.select == "best_reward" and (found := terminals(root)):
        return max(found, key=lambda n: (n.reward, n.N)).path()
    key = (lambda c: (c.N, c.q)) if cfg.select != "q" else (lambda c: (c.q, c.N))
    node = root
    while visited := [c for c in node.children if c.N > 0]:
        node = max(visited, key=key)
    if node.children:  # sampled and evaluated at expansion, never selected: no need to resample
        node = max(node.children, key=lambda c: (evaluate(c, cfg), c.prior))
    return node.path()


def search_tree_to_dict(root: Node) -> dict:
    """JSON-able tree (text, prior, N, Q, terminal, reward, value, children) for tree pictures."""
    return {"text": root.text, "prior": root.prior, "N": root.N, "Q": root.q,
            "terminal": root.terminal, "reward": root.reward, "value": root.value,
            "children": [search_tree_to_dict(c) for c in root.children]}


def _fit(completion, budget: int, tokenizer):
    """Cut a sample to the tokens left under max_total_tokens (the batch shares max_new_tokens)."""
    if len(completion.tokens) <= budget:
        return completion
    tokens = completion.tokens[:budget]
    return dataclasses.replace(
        completion, tokens=tokens, logprobs=completion.logprobs[:budget], finish_reason="length",
        text=tokenizer.decode(tokens, skip_special_tokens=True), value=None)


def _check(cfg: MCTSConfig) -> None:
    if cfg.select not in SELECT_MODES:
        raise ValueError(f"MCTSConfig.select must be one of {SELECT_MODES}, got {cfg.select!r}")
    if cfg.terminal_value not in TERMINAL_VALUES:
        raise ValueError(f"MCTSConfig.terminal_value must be one of {TERMINAL_VALUES}, "
                         f"got {cfg.terminal_value!r}")
    for name in ("workers", "iterations", "k", "max_step_tokens", "max_total_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"MCTSConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_tree_tokens < 0:
        raise ValueError(f"MCTSConfig.max_tree_tokens must be >= 0, got {cfg.max_tree_tokens}")
    if 0 < cfg.max_tree_tokens < expansion_cost(cfg) + cfg.max_total_tokens:
        raise ValueError(f"MCTSConfig.max_tree_tokens={cfg.max_tree_tokens} leaves no room for one "
                         f"expansion ({expansion_cost(cfg)}) plus the final rollout "
                         f"({cfg.max_total_tokens})")


def expansion_cost(cfg: MCTSConfig) -> int:
    """Most tokens one expansion can generate: K samples of at most max_step_tokens."""
    return cfg.k * cfg.max_step_tokens


def can_expand(tokens_used: int, cfg: MCTSConfig) -> bool:
    """Token budget: one more worst-case expansion still leaves max_total_tokens for the rollout."""
    return (not cfg.max_tree_tokens
            or tokens_used + expansion_cost(cfg) + cfg.max_total_tokens <= cfg.max_tree_tokens)


@dataclass(eq=False)
class _Tree:
    """One problem's search: its tree and counters (the token budget among them)."""

    problem: countdown.Problem
    prompt_ids: list[int]
    root: Node = field(default_factory=lambda: Node(value=0.0))  # its Q is never compared: backs up 0
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("nodes", "expansions", "collisions", "terminal_backups", "tokens_generated"), 0))
    out_of_budget: bool = False  # max_tree_tokens spent: this tree's search is over


def search(problems: list[countdown.Problem], sampler, cfg: MCTSConfig | None = None
           ) -> list[SearchResult]:
    """Parallel MCTS on one tree per problem, all trees expanded in the same batched sampler calls.

    As a test-time search harness (no ground truth): cfg.select "visits" or "q" with
    cfg.terminal_value "value_head"; only SearchResult.reward then looks at the target.
    """
    cfg = cfg or MCTSConfig()
    _check(cfg)
    trees = [_Tree(p, countdown.prompt_ids(p, sampler.tokenizer)) for p in problems]
    for _ in range(cfg.iterations):  # one round = one selection by every worker of every tree
        to_expand, collided = [], []
        for tree in trees:  # 1. select (a terminal leaf is evaluated and backed up at once)
            _select_workers(tree, cfg, to_expand, collided)
        if to_expand:  # 2. expand: K steps per leaf, for every tree in one sampler call
            budget = max(cfg.max_total_tokens - path[-1].length for _, path in to_expand)
            outs = _generate(sampler, [(t, path[-1]) for t, path in to_expand],
                             min(cfg.max_step_tokens, budget), cfg, n=cfg.k,
                             stop=(STEP_END, ANSWER_CLOSE), want_values=True)
            for (tree, path), completions in zip(to_expand, outs):
                expand(path[-1], completions, tree.problem, cfg)
                tree.stats["expansions"] += 1
                tree.stats["nodes"] += len(path[-1].children)
        # 3. evaluate each expanded leaf (V(s)) and 4. back it up, then each collided worker's
        for _, path in to_expand + collided:
            backup(path, evaluate(path[-1], cfg), cfg)
        if all(tree.out_of_budget for tree in trees):
            break
    return _results(trees, [greedy_select(tree.root, cfg) for tree in trees], sampler, cfg)


def _select_workers(tree: _Tree, cfg: MCTSConfig, to_expand: list, collided: list) -> None:
    """Every worker of one tree selects a leaf (virtual loss spreads them): a terminal leaf is
    backed up at once, a leaf another worker picked this round waits for that expansion (a
    collision); new leaves join `to_expand` while the tree's token budget allows."""
    in_round: set[int] = set()
    for _ in range(cfg.workers):
        if tree.out_of_budget:
            break
        path = select_leaf(tree.root, cfg)
        leaf = path[-1]
        if leaf.terminal:  # nothing to expand: back up its evaluation at once
            backup(path, evaluate(leaf, cfg), cfg)
            tree.stats["terminal_backups"] += 1
        elif id(leaf) in in_round:
            collided.append((tree, path))
            tree.stats["collisions"] += 1
        elif not can_expand(tree.stats["tokens_generated"] + len(in_round) * expansion_cost(cfg),
                            cfg):  # this round's expansions counted at their worst case
            _remove_virtual_loss(path, cfg)
            tree.out_of_budget = True
        else:
            in_round.add(id(leaf))
            to_expand.append((tree, path))


def _generate(sampler, jobs: list[tuple[_Tree, Node]], max_new_tokens: int, cfg: MCTSConfig,
              **kw) -> list[list]:
    """One sampler call continuing each (tree, node), counted in the tree's tokens and cut to
    max_total_tokens."""
    contexts = [tree.prompt_ids + path_tokens(node) for tree, node in jobs]
    outs = sampler.generate(contexts, max_new_tokens=max_new_tokens, temperature=cfg.temperature,
                            top_p=1.0, **kw)
    for (tree, _), samples in zip(jobs, outs):
        tree.stats["tokens_generated"] += sum(len(c.tokens) for c in samples)
    return [[_fit(c, cfg.max_total_tokens - node.length, sampler.tokenizer) for c in samples]
            for (_, node), samples in zip(jobs, outs)]


def _results(trees: list[_Tree], paths: list[list[Node]], sampler, cfg: MCTSConfig
             ) -> list[SearchResult]:
    """The selected paths as trajectories: a path that stops at a non-terminal node is finished
    by one policy rollout to the answer (can_expand kept max_total_tokens free for it)."""
    jobs = [(tree, path[-1]) for tree, path in zip(trees, paths) if not path[-1].terminal]
    rollouts = {}
    if jobs:
        budget = max(cfg.max_total_tokens - node.length for _, node in jobs)
        outs = _generate(sampler, jobs, budget, cfg, n=1, stop=(ANSWER_CLOSE,), want_values=False)
        rollouts = {id(tree): samples[0] for (tree, _), samples in zip(jobs, outs)}
    results = []
    for tree, path in zip(trees, paths):
        steps, rollout = path[1:], rollouts.get(id(tree))
        tokens = [x for n in steps for x in n.tokens] + (rollout.tokens if rollout else [])
        logprobs = [x for n in steps for x in n.logprobs] + (rollout.logprobs if rollout else [])
        text = "".join(n.text for n in steps) + (rollout.text if rollout else "")
        s = tree.stats
        s.update(depth=len(steps), max_depth=max(n.depth for n in _nodes(tree.root)),
                 from_rollout=int(rollout is not None),
                 rollout_tokens=len(rollout.tokens) if rollout is not None else 0,
                 # every selection backs up once: a terminal, a collision or an expansion
                 selections=s["terminal_backups"] + s["collisions"] + s["expansions"])
        results.append(SearchResult(
            prompt_ids=list(tree.prompt_ids), tokens=tokens, logprobs=logprobs, text=text,
            reward=countdown.dense_reward(text, tree.problem), stats=s, root=tree.root, path=path))
    return results


def path_tokens(node: Node) -> list[int]:
    """The completion tokens from the root to the end of this node's step."""
    return [x for n in node.path() for x in n.tokens]
