"""Online distillation of tree search into the policy: the blog's "Training" and "Baselines"
sections, top to bottom: the flags (`Args`, `--preset blog`), the trajectory producers (one per
method), `collate` and `train_step` (shared by all six methods), the generator and trainer
loops, and `run`. The blog's "Infrastructure" (Rust + gRPC + Redis there) is plumbing a reader
may skip: shared weights, the trajectory queue and DDP in infrastructure.py, the run directory
and checkpoints in rundir.py, the processes' supervision in supervise.py.

Process layout (spawn context):
  main        builds the model and data, owns the shared weights buffer, spawns the children,
              writes metrics.jsonl / events.jsonl, shows progress and stops everything on failure.
  generators  pull prompts (a fixed, per-generator slice of a seeded order of the train set),
              produce trajectories (`PRODUCERS`: mcts = tree search + greedy selection; cispo =
              groups of samples with group-relative advantages; bon = best of N by dense
              reward; treepo, treerl = tree rollouts with tree advantages; sft = the solver's
              traces) and put them on a queue of shared-memory tensors (the blog's Redis
              stream). Between work items they load newer weights (the blog's pub/sub).
  trainers    DDP (gloo on CPU, nccl on GPU): pull batch / n_trainers trajectories, one
              forward for log-probs and V(s_t), one AdamW step on L_total; every sync_every
              steps rank 0 publishes weights; it also evaluates mean@16 and writes checkpoints.
"""

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import torch
import transformers
import tyro

import countdown
import diagnostics
import eval as evaluation
import infrastructure as infra
import losses
import mcts
import rundir
import sampler as sampler_lib
import supervise
import tiny
import treepo
import treerl
from flags import check_flags
from infrastructure import Shared
from value_head import PolicyWithValue, load_policy, machine, model_checksum


@dataclass
class Args:
    """Defaults are the embedded CPU run (tiny model, 2 cores); `--preset blog` is the blog's table."""

    method: Literal["mcts", "cispo", "bon", "treepo", "treerl", "sft"] = "mcts"
    """trajectories trained on: tree search (blog), CISPO groups, best-of-N, TreePO (treepo.py),
    TreeRL (treerl.py), or the control sft: the solver's traces (the warm start's data)"""
    preset: Literal["none", "blog"] = "none"  # 'blog': the blog's table (explicit flags still win)
    model: str = "tiny"  # 'tiny' (embedded char-level Qwen2), a local checkpoint dir or a HF hub id
    backend: Literal["auto", "torch", "vllm"] = "auto"
    """sampling engine; auto: torch below 100M parameters, else vLLM if installed (sampler.py)"""
    n_generators: int = 1  # number of generator processes (blog: Ng = 6)
    n_trainers: int = 1  # number of DDP trainer processes (blog: Nt = 2)
    batch_size: int = 8  # trajectories per optimizer step for mcts/bon/sft (blog: 32)
    cispo_groups: int = 2  # prompts per step for cispo/treepo/treerl, each x group_size (blog: 128)
    group_size: int = 16
    """samples per prompt of a CISPO group (blog: 16); also TreePO's tree width w"""
    bon_n: int = 64  # best-of-N: samples per prompt, the best by dense reward trained on (blog: 64)
    prompts_per_call: int = 4  # prompts per batched call (MCTS trees, CISPO groups, BoN prompts)
    treepo_segment_len: int = 16  # TreePO: tokens per segment L (paper: 512)
    treepo_branch: int = 2  # TreePO: forks per node and round b (paper: 2)
    treerl_m: int = 6  # TreeRL: initial i.i.d. responses per prompt M (paper: 6)
    treerl_n: int = 2  # TreeRL: forking points (top -log pi) per tree and iteration N (paper: 2)
    treerl_l: int = 1  # TreeRL: forking iterations L (paper: 1)
    treerl_t: int = 2  # TreeRL: branches per forking point T (paper: 2)
    tree_reward: Literal["dense", "sparse"] = "dense"
    """TreePO/TreeRL advantages' reward: dense (as CISPO/BoN) or sparse (0/1, both papers')"""
    mcts_workers: int = 16  # parallel MCTS agents sharing one tree with virtual loss (blog: 16)
    mcts_iterations: int = 12
    """MCTS iterations per worker, M (blog: 100): a tree gets mcts_workers x M selections in M
    batched rounds, and an answer at depth d needs M >= d + 1 rounds (mcts.py)"""
    mcts_k: int = 4  # completions per expanded leaf, K (blog: 4)
    c_puct: float = 2.0  # pUCT exploration (blog: 0.5; at our small M the prior needs more weight: mcts.py)
    mcts_virtual_value: float = -1.0  # virtual visit's value: -1 virtual loss, 0 visits only (blog)
    mcts_max_tree_tokens: int = 0  # MCTS tokens per tree, search + rollout (0: M bounds)
    mcts_select: Literal["visits", "q", "best_reward"] = "visits"
    """greedy selection after search: most-visited child (blog), highest Q, or best terminal reward"""
    mcts_baseline: Literal["value", "tree"] = "tree"
    """A = r - sg(V(s_t)) (blog; why it is not the default: README), or r - mean reward of the
    tree's answers (default: the selection's advantage over the search's own answers)"""
    mcts_distill: Literal["path", "whole"] = "path"
    """what the search teaches: the selected trajectory (blog), or every distinct answer in the
    tree with tree-relative advantages (whole-tree distillation, `whole_tree_trajectories`)"""
    mcts_credit: Literal["leaf", "step", "visits"] = "leaf"
    """whole tree: an answer's reward minus the mean of the tree's other answers on all its tokens
    (leaf), TreeRL's per-step credit from subtree means (step), or the visited answers weighted
    by their visit counts against the tree's mean reward (visits)"""
    kl_warn: float = 0.1  # warn once when the k3 KL to the start model passes this (0: never)
    search_gain_problems: int = 16
    """mcts: at each eval, the search gain on this many eval problems (vs eval_n samples; 0: off)"""
    temperature: float = 1.0  # generators' sampling temperature (log-probs: the raw policy's)
    max_new_tokens: int = 96  # token cap of a whole completion (CISPO/BoN samples, eval)
    max_step_tokens: int = 32  # token cap of one reasoning step (one MCTS expansion, up to </step>)
    sync_every: int = 8  # publish weights to the generators every this many steps (blog: 8)
    loss: Literal["cispo", "ppo"] = "cispo"  # policy loss: CISPO (blog) or PPO clipped surrogate
    eps_high: float = 5.0
    """CISPO epsilon_high: cap of the detached importance weight (blog: 5.0; MiniMax-M1 caps at
    1 + eps_high: pass 6.0 for its reading)"""
    c_ppo: float = 1.0  # policy loss weight c_ppo (blog: 1.0)
    c_value: float = 1.0  # value loss weight c_value (blog: 1.0)
    c_kl: float = 0.05  # k3 KL(pi_theta || pi_ref) weight c_KL (blog: 0.05)
    lr: float = 5e-6  # AdamW lr (blog author's code: 5e-6; larger drifts the KL: figures/README.md)
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to 0 at --steps (blog author's code: linear, no warm-up)"""
    loss_agg: Literal["token", "sequence"] = "token"
    """loss mean over the batch's tokens, or per sequence then over sequences (blog author's code)"""
    max_grad_norm: float = 0.1  # gradient norm clipping (blog author's code: 0.1)
    steps: int = 100000  # optimizer steps (the CPU default is bounded by --time-limit-min instead)
    time_limit_min: float = 12.0  # stop after this many minutes: eval, checkpoint (0: no limit)
    eval_every: int = 100  # eval every N steps, before the first and after the last (0: only those)
    eval_problems: int = 200  # eval on the first this many test problems (blog: all 820)
    eval_n: int = 16  # samples per eval problem: mean@16 (blog)
    eval_temperature: float = 1.0  # sampling temperature for eval
    checkpoint_every: int = 100  # write a checkpoint every this many steps (and at the end)
    final_eval: bool = True
    """at the end, mean@16 on all 820 test problems (eval.py, T = 1.0) into <out>/eval_t1.json,
    paired per problem with the tiny start model's shipped eval: the 200-problem curve is too
    noisy (+-1.2 points) to show a gain of a few points"""
    out: str = ""  # run directory (default runs/<method>-seed<seed>)
    resume: str = ""  # run dir to continue from its latest checkpoint (give the original flags)
    overwrite: bool = False  # start afresh in a non-empty --out (deletes its checkpoints and logs)
    seed: int = 0  # seed of the data order, sampling and the trainers
    torch_threads: int = 1  # torch threads per process (2-core box: 1 each)
    stall_timeout_s: float = 120.0  # end the run when a child stalls this long (stopped, frozen)
    dry_run: bool = False  # print the resolved config and exit without starting anything


# The blog's table of values and its method (A = r - sg(V), virtual loss as visits only); what
# the table leaves out from the author's code (lr and its linear decay over 2,048 steps, grad
# clip, per-sequence loss mean, sampling temperature 0.8, steps of up to 64 tokens, eval every
# 6 weight syncs at temperature 0.2 with up to 512 tokens).
BLOG_PRESET = {
    "model": "Qwen/Qwen2.5-1.5B-Instruct", "backend": "vllm", "n_generators": 6, "n_trainers": 2,
    "batch_size": 32, "cispo_groups": 128, "group_size": 16, "bon_n": 64, "mcts_workers": 16,
    "mcts_iterations": 100, "mcts_k": 4, "c_puct": 0.5, "mcts_virtual_value": 0.0,
    "mcts_baseline": "value", "mcts_distill": "path", "sync_every": 8, "eps_high": 5.0,
    "c_ppo": 1.0, "c_value": 1.0, "c_kl": 0.05, "lr": 5e-6, "max_grad_norm": 0.1,
    "max_new_tokens": 512, "max_step_tokens": 64, "temperature": 0.8, "prompts_per_call": 4,
    "steps": 2048, "time_limit_min": 0.0, "eval_every": 48, "eval_problems": 820, "eval_n": 16,
    "eval_temperature": 0.2, "lr_schedule": "linear", "loss_agg": "sequence", "checkpoint_every": 48,
}
PRESETS = {"none": {}, "blog": BLOG_PRESET}


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro CLI whose defaults are the chosen preset, so explicit flags override the preset."""
    argv = sys.argv[1:] if argv is None else argv
    preset = "none"
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
    if preset not in PRESETS:
        raise SystemExit(f"train.py: error: unknown preset {preset!r} (choose from {sorted(PRESETS)})")
    return tyro.cli(Args, args=argv, default=replace(Args(), preset=preset, **PRESETS[preset]))


GROUP_METHODS = ("cispo", "treepo", "treerl")  # many trajectories per prompt, relative advantages


def traj_per_step(args: Args) -> int:
    """Global batch in trajectories: B for MCTS/BoN, groups x group size for CISPO (blog: 128 x 16)
    and for the tree methods that send many answers per prompt (TreePO, TreeRL, MCTS whole tree)."""
    if args.method in GROUP_METHODS or (args.method == "mcts" and args.mcts_distill == "whole"):
        return args.cispo_groups * args.group_size
    return args.batch_size


FLAG_RULES = {  # checked first by check_args, one clear line for the first flag out of range
    ">= 1": ("n_generators", "n_trainers", "batch_size", "cispo_groups", "group_size", "bon_n",
             "prompts_per_call", "mcts_workers", "mcts_iterations", "mcts_k", "max_new_tokens",
             "max_step_tokens", "sync_every", "steps", "eval_problems", "eval_n",
             "checkpoint_every", "torch_threads"),
    "finite >= 0": ("lr", "c_ppo", "c_value", "c_kl", "temperature",
                    "eval_temperature", "time_limit_min", "kl_warn"),
    "finite > 0": ("max_grad_norm", "eps_high", "stall_timeout_s"),
    ">= 0": ("eval_every", "search_gain_problems"),
}


def check_args(args: Args) -> None:
    """Fail fast with one clear line on invalid values and combinations."""
    def fail(msg: str):
        raise SystemExit(f"train.py: error: {msg}")
    check_flags("train.py", asdict(args), FLAG_RULES)
    if args.method == "cispo" and args.group_size < 2:
        fail("--method cispo needs --group-size >= 2 (advantages are relative to the group)")
    if traj_per_step(args) % args.n_trainers:
        what = ("cispo_groups x group_size" if args.method in GROUP_METHODS else "batch_size")
        fail(f"{what} = {traj_per_step(args)} is not divisible by --n-trainers {args.n_trainers}")
    cfg = mcts_config(args)
    need = mcts.expansion_cost(cfg) + cfg.max_total_tokens  # mcts.can_expand's first expansion
    if args.method == "mcts" and 0 < args.mcts_max_tree_tokens < need:
        fail(f"--mcts-max-tree-tokens {args.mcts_max_tree_tokens} leaves no room for one expansion "
             f"plus the rollout: needs >= mcts_k x max_step_tokens + max_new_tokens = {need}")
    if args.eval_problems > 820:
        fail(f"--eval-problems {args.eval_problems} exceeds the 820 test problems")
    if args.resume and args.overwrite:
        fail("--resume continues a run, --overwrite deletes it: pass one")
    if args.dry_run:
        return
    if args.preset == "blog" and not torch.cuda.is_available():
        fail("--preset blog needs GPUs (the blog used 8 x H100); on a CPU box use it with --dry-run")
    if args.backend == "vllm" and find_spec("vllm") is None:
        fail("--backend vllm needs the vllm package (pip install -r requirements-vllm.txt)")


# ------------------------------------------------------------------------------------------------
# Generators: trajectories by method


def trajectory(prompt_ids, tokens, logprobs, reward: float, advantage: float | list[float] | None,
               version: int, info: dict[str, float] | None = None) -> dict:
    """One training item. `advantage` is one number for every token (CISPO, TreePO, SFT, MCTS with
    --mcts-baseline tree), a per-token list (TreeRL's step advantages), or None (MCTS, BoN): the
    trainer computes theirs, r - sg(V(s_t)), from its own forward (`advantages`).
    `info`: numbers logged as batch means (the search's own metrics)."""
    if not isinstance(advantage, (list, tuple)):
        advantage = [0.0 if advantage is None else advantage] * len(tokens)
    return {
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "old_logprobs": torch.tensor(logprobs, dtype=torch.float32),
        "reward": torch.tensor(reward, dtype=torch.float32),
        "advantages": torch.tensor(advantage, dtype=torch.float32),
        "version": torch.tensor(version, dtype=torch.int64),
        "info": {k: float(v) for k, v in (info or {}).items()},
    }


def mcts_config(args: Args) -> mcts.MCTSConfig:
    """The search knobs of the flags."""
    return mcts.MCTSConfig(workers=args.mcts_workers, iterations=args.mcts_iterations, k=args.mcts_k,
                           c_puct=args.c_puct, temperature=args.temperature,
                           max_step_tokens=args.max_step_tokens, max_total_tokens=args.max_new_tokens,
                           virtual_value=args.mcts_virtual_value, select=args.mcts_select,
                           max_tree_tokens=args.mcts_max_tree_tokens)


def search_info(r: mcts.SearchResult) -> dict[str, float]:
    """The search's own metrics, logged as batch means (is the search reaching answers?)."""
    return {"search_depth": r.stats["depth"], "search_from_rollout": r.stats["from_rollout"],
            "search_terminal_backups": r.stats["terminal_backups"],
            "search_tree_tokens": r.stats["tokens_generated"]}


def mcts_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """Blog's method: parallel MCTS over reasoning steps, then greedy selection of one trajectory
    (or, with --mcts-distill whole, every answer of the tree: `whole_tree_trajectories`)."""
    results = mcts.search(problems, sampler, mcts_config(args))
    if args.mcts_distill == "whole":
        return [t for r in results for t in whole_tree_trajectories(r, args.mcts_credit, version)]
    trajs = []
    for r in results:
        answers = [n for n in mcts.terminals(r.root) if n is not r.path[-1]]
        advantage = None  # blog: r - sg(V(s_t)), computed by the trainer
        if args.mcts_baseline == "tree":  # r - mean reward of every answer the search produced
            advantage = r.reward - sum([r.reward] + [n.reward for n in answers]) / (1 + len(answers))
        trajs.append(trajectory(r.prompt_ids, r.tokens, r.logprobs, r.reward, advantage, version,
                                search_info(r)))
    return trajs


def whole_tree_trajectories(r: mcts.SearchResult, credit: str, version: int) -> list[dict]:
    """Beyond the blog: every distinct answer the search sampled (`mcts.answers`: the tree's
    terminals, visited or not, and the selection's rollout) is one trajectory. Its advantage comes
    from the tree's own answers (no value head, no extra sampling): leave-one-out (TreeRL's leaf
    baseline, `losses.leave_one_out_advantages`) on every token, or TreeRL's step credit
    (`losses.tree_step_advantages`) per step. The search is the blog's; what it teaches is all it
    found, not one path (Stream of Search: more than the optimal path helps on Countdown).
    `visits`: only the answers the search backed up, weighted by its visit counts
    (`losses.visit_weighted_advantages`), as AlphaZero distils the search's distribution."""
    answers = mcts.answers(r)
    rewards = [a.reward for a in answers]
    if credit == "step":
        per_answer = losses.tree_step_advantages([x.steps for x in answers], rewards)
    else:
        per_answer = [[a] * len(x.steps) for a, x in zip(
            losses.leave_one_out_advantages(rewards) if credit == "leaf" else
            losses.visit_weighted_advantages(rewards, [x.visits for x in answers]), answers)]
    if credit == "visits":  # unvisited answers carry no gradient: leave them out of the batch
        kept = [i for i, x in enumerate(answers) if x.visits]
        answers, per_answer = [answers[i] for i in kept], [per_answer[i] for i in kept]
    info = search_info(r) | {"search_answers": len(answers)}
    return [trajectory(r.prompt_ids, x.tokens, x.logprobs, x.reward,
                       [a for a, n in zip(adv, x.lengths) for _ in range(n)],
                       version, info)
            for x, adv in zip(answers, per_answer)]


def cispo_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """CISPO baseline: group_size samples per prompt, advantage = reward - group mean."""
    prompts = [countdown.prompt_ids(p, sampler.tokenizer) for p in problems]
    outs = sampler.generate(prompts, n=args.group_size, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, stop=(countdown.ANSWER_CLOSE,))
    rewards = torch.tensor([[countdown.dense_reward(c.text, p) for c in group]
                            for p, group in zip(problems, outs, strict=True)])
    adv = losses.group_advantages(rewards)
    return [trajectory(ids, c.tokens, c.logprobs, rewards[i, j].item(), adv[i, j].item(), version)
            for i, (ids, group) in enumerate(zip(prompts, outs)) for j, c in enumerate(group)]


def bon_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """Best-of-N baseline: the tree search replaced by the best of N samples by dense reward."""
    prompts = [countdown.prompt_ids(p, sampler.tokenizer) for p in problems]
    outs = sampler.generate(prompts, n=args.bon_n, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, stop=(countdown.ANSWER_CLOSE,))
    trajs = []
    for p, ids, group in zip(problems, prompts, outs, strict=True):
        rewards = [countdown.dense_reward(c.text, p) for c in group]
        best = max(range(len(group)), key=rewards.__getitem__)
        trajs.append(trajectory(ids, group[best].tokens, group[best].logprobs, rewards[best],
                                None, version))
    return trajs


def treepo_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """TreePO: segment-level tree sampling, w = group_size trajectories per prompt, tree advantages."""
    cfg = treepo.TreePOConfig(segment_len=args.treepo_segment_len,
                              max_depth=max(1, args.max_new_tokens // args.treepo_segment_len),
                              branch=args.treepo_branch, width=args.group_size,
                              temperature=args.temperature, seed=args.seed, reward=args.tree_reward)
    return [trajectory(t["prompt_ids"], t["tokens"], t["old_logprobs"], t["reward"],
                       t["advantages"], version) for t in treepo.treepo_rollouts(problems, sampler, cfg)]


def treerl_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """TreeRL: EPTree forking at high -log pi tokens, per-step global + local advantages."""
    cfg = treerl.TreeRLConfig(M=args.treerl_m, N=args.treerl_n, L=args.treerl_l, T=args.treerl_t,
                              temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              reward=args.tree_reward)
    return [trajectory(t["prompt_ids"], t["tokens"], t["old_logprobs"], t["reward"],
                       t["advantages"], version) for t in treerl.treerl_rollouts(problems, sampler, cfg)]


def sft_trajectories(problems, sampler, args: Args, version: int) -> list[dict]:
    """The control: the warm start trained further on its own data (the solver's traces) through
    the same step. Advantage 1 on every token with teacher-forced old log-probs (ratio ~ 1) makes
    CISPO's term SFT, KL and value loss included. Without it an RL gain may be just more SFT."""
    tok, policy = sampler.tokenizer, sampler.policy
    device = next(policy.parameters()).device
    trajs = []
    with torch.no_grad():
        for p in problems:
            prompt, text = countdown.prompt_ids(p, tok), countdown.solution_trace(p)
            trace = tok(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + trace], device=device)
            logits, _ = policy(ids)
            logp = losses.token_logprobs(logits[:, len(prompt) - 1:-1], ids[:, len(prompt):])
            trajs.append(trajectory(prompt, trace, logp[0].tolist(),
                                    countdown.dense_reward(text, p), 1.0, version))
    return trajs


PRODUCERS = {"mcts": mcts_trajectories, "cispo": cispo_trajectories, "bon": bon_trajectories,
             "treepo": treepo_trajectories, "treerl": treerl_trajectories,
             "sft": sft_trajectories}


def work_item(train: list, order: list[int], args: Args, g: int, pos: int) -> list:
    """Deterministic data position: generator g's pos-th call takes global chunk pos * Ng + g."""
    chunk = pos * args.n_generators + g
    idx = [(chunk * args.prompts_per_call + j) % len(train) for j in range(args.prompts_per_call)]
    return [train[order[i]] for i in idx]


def generator(args: Args, sh: Shared, g: int, train: list) -> None:
    """Generator loop: sync weights if newer, produce trajectories, queue them."""
    policy, tokenizer = load_policy(args.model)
    policy.to(infra.device_for(g))
    pos = sh.data_pos[g]  # 0, or where the checkpoint we resume from left off
    smp = sampler_lib.make_sampler(args.backend, policy, tokenizer, seed=args.seed * 1000 + g + 7919 * pos)
    tokens_before = sh.gen_tokens[g]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    version = -1
    while not sh.exit_now.is_set():
        if sh.version.value != version:  # blog: generators pick up weights published by trainers
            version = infra.pull_weights(sh, g, smp, pos)
        t0 = time.perf_counter()
        trajs = PRODUCERS[args.method](work_item(train, order, args, g, pos), smp, args, version)
        pos += 1
        infra.queue_trajectories(sh, g, trajs, pos, tokens_before + smp.tokens_generated,
                                 time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Trainers: one shared training step for the six methods


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion; the loss mask covers the completion tokens, shifted by one so
    position t holds the distribution over token t+1 (and V(s_t) of the state before it)."""
    B, L = len(batch), max(len(b["prompt_ids"]) + len(b["tokens"]) for b in batch)
    ids = torch.full((B, L), pad_id, dtype=torch.int64)
    attn = torch.zeros(B, L, dtype=torch.int64)
    mask, old, adv = (torch.zeros(B, L - 1) for _ in range(3))
    for i, b in enumerate(batch):
        P, T = len(b["prompt_ids"]), len(b["tokens"])
        ids[i, :P + T] = torch.cat([b["prompt_ids"], b["tokens"]])
        attn[i, :P + T] = 1
        mask[i, P - 1:P - 1 + T] = 1.0
        old[i, P - 1:P - 1 + T] = b["old_logprobs"]
        adv[i, P - 1:P - 1 + T] = b["advantages"]
    return {"input_ids": ids, "attention_mask": attn, "mask": mask, "old_logprobs": old,
            "rewards": torch.stack([b["reward"] for b in batch]), "advantages": adv,
            "versions": torch.stack([b["version"] for b in batch])}


def lr_at(step: int, args: Args) -> float:
    """lr of step `step` (0-based): constant, or transformers' "linear": lr * (1 - step / steps)."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr * max(0.0, 1.0 - step / args.steps)


def advantages(args: Args, batch: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-token advantages [B, T-1], by method. MCTS (--mcts-baseline value) and BoN: the blog's
    A_t = r - sg(V_old(s_t)), V_old from the trainer's pre-step forward (one PPO inner step, so
    the old model up to policy lag). The others bring theirs from the generator: group- (CISPO)
    or tree-relative (TreePO, TreeRL, MCTS with --mcts-baseline tree), or 1 everywhere (SFT)."""
    if args.method == "bon" or (args.method == "mcts" and args.mcts_baseline == "value"):
        return losses.value_advantages(batch["rewards"], values, batch["mask"])
    return batch["advantages"] * batch["mask"]


def train_step(model, ref: PolicyWithValue | None, opt, batch: dict, args: Args) -> dict:
    """One forward for log pi and V(s_t), the blog's L_total, one AdamW step (single PPO inner step)."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
    logits, values = model(ids, attention_mask=attn)
    logp = losses.token_logprobs(logits[:, :-1], ids[:, 1:])
    values = values[:, :-1]
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp = losses.token_logprobs(ref(ids, attention_mask=attn)[0][:, :-1], ids[:, 1:])
    per_token = advantages(args, batch, values)
    loss, stats = losses.total_loss(
        logp, batch["old_logprobs"], ref_logp, values, batch["rewards"], per_token, mask,
        c_ppo=args.c_ppo, c_value=args.c_value, c_kl=args.c_kl if ref is not None else 0.0,
        loss=args.loss, eps_high=args.eps_high, agg=args.loss_agg)
    with torch.no_grad():
        stats.update(diagnostics.health_stats(logits[:, :-1], logp, values, per_token, batch))
    # One rule for a non-finite loss and a non-finite gradient norm: no update, the step counted
    # as skipped (it would make every weight NaN); MAX_SKIPS in a row end the run (`trainer`).
    opt.zero_grad(set_to_none=True)
    bad_loss = not math.isfinite(stats["total_loss"])
    if torch.distributed.is_initialized():  # every rank skips, or none: backward syncs them
        bad_loss = infra.any_rank(bad_loss, loss.device)
    if bad_loss:
        stats.update(grad_norm=float("nan"), skipped_step=1.0, skipped_loss=1.0)
        return stats
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    stats["grad_norm"] = grad_norm.item()
    stats["skipped_step"] = float(not torch.isfinite(grad_norm))  # same on every DDP rank
    if stats["skipped_step"]:
        opt.zero_grad(set_to_none=True)
    else:
        opt.step()
    return stats


MAX_SKIPS = 10  # consecutive skipped updates that end a run: its weights no longer train


def check_skips(stats: dict, in_a_row: int, step: int) -> int:
    """Skipped updates in a row after this step; raises once they reach MAX_SKIPS."""
    in_a_row = in_a_row + 1 if stats["skipped_step"] else 0
    if in_a_row >= MAX_SKIPS:
        what = "loss" if stats.get("skipped_loss") else "gradient norm"
        raise FloatingPointError(
            f"{MAX_SKIPS} updates in a row skipped by step {step} (the last: non-finite {what}; "
            f"policy {stats['policy_loss']}, value {stats['value_loss']}, kl {stats['kl']}): "
            "stopping; the last checkpoints are intact (lower --lr / --max-grad-norm?)")
    return in_a_row


def make_optimizer(policy: torch.nn.Module, args: Args) -> torch.optim.AdamW:
    """AdamW at --lr without weight decay (torch's default is 0.01): the KL term, not decay,
    holds the policy near its start."""
    return torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)


class RankZero:
    """Rank 0's chores around the shared step: warn, publish weights, evaluate, log, checkpoint,
    and decide when the run ends (--time-limit-min, or a signal's request to stop)."""

    def __init__(self, args: Args, sh: Shared, policy, tokenizer, opt, test: list,
                 t_start: float, wall0: float, saved: int):
        self.args, self.sh, self.policy, self.tokenizer, self.opt = args, sh, policy, tokenizer, opt
        self.test, self.t_start, self.wall0 = test, t_start, wall0
        self.saved = saved  # the last step checkpointed (-1: none)
        self.alarms = diagnostics.Alarms(args.kl_warn)

    def wall(self) -> float:
        """Training seconds, a resumed run's earlier ones included."""
        return self.wall0 + time.time() - self.t_start

    def should_stop(self) -> bool:
        return (self.sh.save_and_exit.is_set()
                or 0 < self.args.time_limit_min * 60 <= time.time() - self.t_start)

    def evaluate(self) -> dict:
        """mean@16 (and an mcts run's search gain) on the eval problems."""
        a = self.args
        return diagnostics.eval_row(self.policy, self.tokenizer, self.test, a.eval_n,
                                    a.eval_temperature, a.max_new_tokens, a.seed,
                                    search=mcts_config(a) if a.method == "mcts" else None,
                                    search_problems=a.search_gain_problems)

    def log_start(self, step: int) -> None:
        """mean@16 "before": no trajectory trained on yet."""
        self.sh.log_q.put({"row": {"step": step, "wall_time": self.wall(), "generated_tokens": 0,
                                   **self.evaluate()}})

    def checkpoint(self, step: int) -> None:
        """Once main has written this step's row (rundir.checkpoint_step)."""
        state = rundir.trainer_state(step, self.opt, self.wall(), self.args.n_generators)
        if rundir.checkpoint_step(self.sh, Path(self.args.out), self.policy, self.tokenizer, state):
            self.saved = step

    def after_step(self, step: int, row: dict, skipped_step: float, last: bool) -> None:
        """Warn, publish every sync_every steps, log the row (with an eval every eval_every steps
        and at the end), checkpoint every checkpoint_every steps and at the end."""
        a, sh = self.args, self.sh
        self.alarms.check(sh, step, skipped_step, row["kl"])
        if step % a.sync_every == 0:
            infra.publish_weights(sh, self.policy, step)
        row.update(step=step, wall_time=self.wall(), skipped_steps=self.alarms.skipped,
                   lr=self.opt.param_groups[0]["lr"], **infra.generator_stats(sh))
        if not sh.save_and_exit.is_set() and (last or (a.eval_every and step % a.eval_every == 0)):
            row.update(self.evaluate())  # (a signal's stop skips it: checkpoint first)
        sh.log_q.put({"row": row})
        if last or step % a.checkpoint_every == 0:
            self.checkpoint(step)

    def stopped_waiting(self, step: int) -> None:
        """The run ends while waiting for trajectories: say why, checkpoint, report done."""
        if not self.sh.save_and_exit.is_set():
            diagnostics.warn(self.sh, step, "time limit reached while waiting for trajectories: "
                                            "stopped without the final eval")
        if self.saved != step:
            self.checkpoint(step)
        self.sh.log_q.put({"done": step})


def trainer(args: Args, sh: Shared, rank: int, port: int, resume_ckpt: str, t_start: float,
            test: list) -> None:
    """DDP trainer, nanoGPT's loop: get a batch, forward, backward, step; rank 0 also publishes
    weights, evaluates, logs and checkpoints (`RankZero`)."""
    device = infra.device_for(args.n_generators + rank)
    infra.init_process_group(device, rank, args.n_trainers, port)  # nccl on GPU, gloo on CPU
    policy, tokenizer = load_policy(args.model)
    # frozen reference for the KL term: the model the run started from (args.model), even on resume
    ref = copy.deepcopy(policy).requires_grad_(False).to(device) if args.c_kl else None
    infra.load_shared_weights(sh, policy)
    policy.to(device)
    model = torch.nn.parallel.DistributedDataParallel(
        policy, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(policy, args)
    step, wall0 = rundir.restore_trainer(resume_ckpt, opt)  # 0, 0.0 for a fresh run
    torch.manual_seed(args.seed + 1000 * rank + step)
    per_rank = traj_per_step(args) // args.n_trainers
    lead = (RankZero(args, sh, policy, tokenizer, opt, test, t_start, wall0,
                     saved=step if resume_ckpt else -1) if rank == 0 else None)
    if lead is not None and not resume_ckpt:
        lead.log_start(step)
    skips = 0  # updates skipped in a row (check_skips)
    while True:
        # rank 0 honours the time limit and a stop request even when no step completes
        batch = infra.next_batch(sh, per_rank, give_up=lead.should_stop if lead else None)
        if batch is None:  # main stopped the run, or (rank 0) time is up or a signal came
            if lead is not None and not sh.exit_now.is_set():
                lead.stopped_waiting(step)
            return
        data = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
        for group in opt.param_groups:  # derived from the step: a resumed run continues it
            group["lr"] = lr_at(step, args)
        stats = train_step(model, ref, opt, data, args)
        skips = check_skips(stats, skips, step + 1)
        logged, malformed = diagnostics.step_metrics(stats, data, batch, tokenizer, step)
        if lead is not None and malformed and step % 10 == 0:  # what malformed answers look like
            sh.log_q.put({"event": "malformed", "step": step, "text": malformed[-300:]})
        row = infra.global_means(logged, device)
        step += 1
        # rank 0's clock (and a stop request) decides the end, for every rank
        stop = infra.any_rank(lead is not None and lead.should_stop(), device)
        last = step == args.steps or stop
        infra.log_checksum(sh, rank, step, policy)  # tests: DDP keeps the ranks' weights identical
        if lead is not None:
            lead.after_step(step, row, stats["skipped_step"], last)
        if last:
            break
    if lead is not None:
        sh.log_q.put({"done": step})


def run(args: Args) -> int:
    """Check the flags, build the shared state, start generators and trainers, supervise them."""
    check_args(args)
    if args.resume:
        args = replace(args, out=args.resume)
    elif not args.out:
        args = replace(args, out=f"runs/{args.method}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.dry_run:
        print(json.dumps(asdict(args), indent=2))
        return 0
    transformers.utils.logging.disable_progress_bar()
    out, G = Path(args.out), args.n_generators
    state, ckpt = rundir.check_run_dir(out, asdict(args), bool(args.resume), args.overwrite,
                                      same=("method", "model", "n_generators"))
    model = tiny.resolve_model(args.model)  # --model tiny: built on first use (minutes, once)
    try:
        policy, _ = load_policy(str(ckpt) if ckpt else model)
    except SystemExit as e:  # value_head's one-line load errors, as train.py's
        raise SystemExit(f"train.py: error: {e}") from None
    resumed_step = state["step"] if state else None
    args = replace(args, backend=sampler_lib.choose_backend(args.backend, policy))  # "auto"
    # which start model on which CPU: the tiny default is rebuilt per box, and rounding differs
    provenance = {"start_checksum": model_checksum(model), "machine": machine()}
    rundir.claim_run_dir(out, asdict(args) | provenance, resumed_step, args.overwrite)
    args = replace(args, model=model)  # config.json keeps "tiny"; the children load the directory
    sh = infra.make_shared(policy, state, G, n_children=G + args.n_trainers,
                           queue_size=2 * traj_per_step(args))
    del policy
    train, test = countdown.make_splits()  # fixed dataset; --seed changes order and sampling
    port, t_start = infra.free_port(), time.time()
    children = {f"generator-{g}": (generator, (args, sh, g, train)) for g in range(G)}
    children |= {f"trainer-{r}": (trainer, (args, sh, r, port, str(ckpt or ""), t_start,
                                            test[:args.eval_problems]))
                 for r in range(args.n_trainers)}
    rc = supervise.supervise(children, sh, out, t_start, threads=args.torch_threads,
                              desc=f"{args.method} training", time_limit_s=args.time_limit_min * 60,
                              steps=args.steps, start_step=resumed_step or 0,
                              eval_n=args.eval_n, stall_timeout_s=args.stall_timeout_s)
    if rc == 0:
        rundir.print_summary(out, args.eval_n, args.eval_problems)
        if args.final_eval:  # paired with the start's shipped eval when the start is tiny's
            evaluation.final_eval(out, "tiny" if Path(args.model) == tiny.SHIPPED else None,
                                  args.backend)
    return rc


if __name__ == "__main__":
    sys.exit(run(parse_args()))
