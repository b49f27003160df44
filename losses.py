"""The blog's "Training" losses: L_total = c_ppo L_cispo + c_value L_value + c_KL D_KL.

Pure functions over padded tensors [B, T] (token log-probs, advantages, a float 0/1 mask), no
model code. Aggregation (`agg`): "token" (default) is the mean over all valid tokens of the batch
(as in DAPO and ScaleRL), so long and short sequences weigh per token; "sequence" is the mean over
each sequence's tokens, then over sequences (the blog author's code, GRPO's original), so every
trajectory weighs the same. Padded positions are removed with `torch.where` *before* any math,
so NaN/inf there can reach neither the loss nor the gradient.
Under DDP each trainer rank takes these means over its own rows and DDP averages the ranks'
gradients: the global token mean only when the ranks hold equal token counts, otherwise each
rank's tokens weigh in inverse proportion to its count (the per-rank reading, as in TRL and
OpenRLHF without a token all-reduce).
"""

import torch
from torch import Tensor


def _valid(fn: str, mask: Tensor, **tensors: Tensor) -> Tensor:
    """Boolean mask of valid tokens, after checking every tensor has the mask's shape."""
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} like mask"
            )
    return mask > 0


def _masked_mean(x: Tensor, valid: Tensor, agg: str = "token") -> Tensor:
    """Mean over the valid tokens of the batch ("token") or of each sequence, then over the
    sequences that have any ("sequence"); 0 when there are none."""
    x = torch.where(valid, x, 0.0)
    if agg == "token":
        return x.sum() / valid.sum().clamp(min=1)
    if agg != "sequence":
        raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {agg!r}")
    count = valid.sum(dim=-1)
    rows = count > 0
    return (x.sum(dim=-1)[rows] / count[rows]).sum() / rows.sum().clamp(min=1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """float32 log pi(tokens) from logits [B,T,V] of any dtype ("logits in float32 as per ScaleRL").

    logits[:, t] must be the distribution over tokens[:, t] (the caller shifts). logsumexp + gather
    avoids materialising a second [B,T,V] log_softmax tensor.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} don't fit tokens {tuple(tokens.shape)}"
        )
    logits = logits.float()
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def cispo_weight(logp: Tensor, old_logp: Tensor, eps_high: float = 5.0) -> Tensor:
    """sg(min(pi_theta / pi_old, eps_high)): CISPO's importance weight, capped from above and detached.

    The blog writes min(ratio, epsilon) with epsilon_high = 5.0, i.e. cap = eps_high; this is also
    the blog author's code and TRL's `loss_type="cispo"` (clamp(ratio, max=epsilon_high).detach()).
    MiniMax-M1 (the CISPO paper, arXiv:2506.13585) clips the weight to 1 + eps_high instead (its
    lower bound is left off, as in its experiments): the same weight at eps_high + 1.
    """
    return torch.exp(logp - old_logp).clamp(max=eps_high).detach()


def cispo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
               eps_high: float = 5.0, agg: str = "token") -> Tensor:
    """Blog's L_cispo: REINFORCE on log pi weighted by the detached, capped ratio, so no token's
    gradient is ever switched off (unlike PPO's clip); d/d logp_t = -w_t A_t / n_tokens."""
    valid = _valid("cispo_loss", mask, logp=logp, old_logp=old_logp, advantages=advantages)
    logp, old_logp, advantages = (torch.where(valid, x, 0.0) for x in (logp, old_logp, advantages))
    w = cispo_weight(logp, old_logp, eps_high)
    # Blog: L_cispo = -E[ sg(min(pi_theta/pi_old, eps)) * A_t * log pi_theta(a_t|s_t) ]
    return -_masked_mean(w * advantages * logp, valid, agg)


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  eps: float = 0.2, agg: str = "token") -> Tensor:
    """Standard PPO clipped surrogate -E[min(r A, clip(r, 1-eps, 1+eps) A)]: `--loss ppo`."""
    valid = _valid("ppo_clip_loss", mask, logp=logp, old_logp=old_logp, advantages=advantages)
    logp, old_logp, advantages = (torch.where(valid, x, 0.0) for x in (logp, old_logp, advantages))
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps, 1.0 + eps) * advantages)
    return -_masked_mean(surrogate, valid, agg)


def clip_fraction(ratio: Tensor, advantages: Tensor, valid: Tensor, loss: str, eps_high: float,
                  eps: float) -> Tensor:
    """The share of valid tokens the policy loss held back: CISPO's weight at its cap, or PPO's
    clip switching the gradient off."""
    if loss == "cispo":
        held = ratio > eps_high
    else:
        held = ((ratio > 1.0 + eps) & (advantages > 0)) | ((ratio < 1.0 - eps) & (advantages < 0))
    return _masked_mean(held.float(), valid)


def value_loss(values: Tensor, returns: Tensor, mask: Tensor, agg: str = "token") -> Tensor:
    """Blog's L_value = E[(V(s_t) - r)^2]; returns [B] (terminal reward, broadcast) or [B,T]."""
    if returns.dim() == 1:
        returns = returns[:, None].expand_as(mask)
    valid = _valid("value_loss", mask, values=values, returns=returns)
    values, returns = (torch.where(valid, x, 0.0) for x in (values, returns))
    return _masked_mean((values - returns) ** 2, valid, agg)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor, agg: str = "token") -> Tensor:
    """Schulman's k3 estimate of D_KL(pi_theta || pi_ref) from tokens sampled by pi_theta (R1).

    Per token r - log r - 1 >= 0 with r = pi_ref/pi_theta. The blog prints the ratio the other way
    up (pi_theta/pi_ref); under samples from pi_theta only r = pi_ref/pi_theta has mean 1, so
    E[r - 1] = 0 and E[-log r] = KL exactly; the printed direction has mean chi^2 - KL instead
    (tests/test_losses.py checks both by Monte Carlo).
    """
    valid = _valid("kl_k3", mask, logp=logp, ref_logp=ref_logp)
    log_r = torch.where(valid, ref_logp, 0.0) - torch.where(valid, logp, 0.0)
    return _masked_mean(torch.exp(log_r) - log_r - 1.0, valid, agg)


def value_advantages(rewards: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Blog's A_t = r_terminal - sg(V_old(s_t)) (MCTS with its value baseline, and best-of-N): the
    same terminal reward on every token, no GAE (traces are long and the reward is terminal, so
    discounting would erase early tokens)."""
    if rewards.shape != mask.shape[:1]:
        raise ValueError(f"value_advantages: rewards must be [B], got {tuple(rewards.shape)}")
    valid = _valid("value_advantages", mask, values=values)
    return torch.where(valid, rewards[:, None] - values.detach(), 0.0)


def group_advantages(rewards: Tensor) -> Tensor:
    """CISPO baseline's group-relative advantage: reward minus its group's mean, [n_groups, G].

    Mean-only (Dr. GRPO), not GRPO's (r - mean) / std: dividing by the group std up-weights groups
    whose rewards barely differ (near-all-right or near-all-wrong prompts), and without it the
    scale of A stays comparable to the MCTS advantage r - V.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"group_advantages: rewards must be [n_groups, G], got {tuple(rewards.shape)}"
        )
    return rewards - rewards.mean(dim=1, keepdim=True)


def leave_one_out_advantages(rewards: list[float]) -> list[float]:
    """A_i = r_i - mean of the *other* answers' rewards (TreeRL's leaf baseline, RLOO): an answer
    is not compared with itself, so with n answers A_i = n / (n - 1) * (r_i - mean). One answer
    alone has nothing to be compared with: 0."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    total = sum(rewards)
    return [r - (total - r) / (n - 1) for r in rewards]


def visit_weighted_advantages(rewards: list[float], visits: list[int]) -> list[float]:
    """The search's own distribution over its answers as the teacher (AlphaZero distils the
    root's visit counts; here at the answer level): answer i weighs N_i / mean N of the visited
    answers, times its reward minus the mean reward of all the tree's answers (the tree
    baseline). Unvisited answers weigh 0: the search sampled them but never backed them up."""
    if len(rewards) != len(visits):
        raise ValueError("visit_weighted_advantages: one visit count per reward")
    visited = [n for n in visits if n > 0]
    if not visited:
        return [0.0] * len(rewards)
    mean_r, mean_n = sum(rewards) / len(rewards), sum(visited) / len(visited)
    return [n / mean_n * (r - mean_r) for r, n in zip(rewards, visits)]


def tree_step_advantages(paths: list[list], rewards: list[float]) -> list[list[float]]:
    """TreeRL's step credit (arXiv 2506.11902, Sec. 3.2) on any tree given by its answers:
    paths[i] = the node ids from the first step to answer i's last step (root excluded), all of
    one prompt. V(s) = mean reward of the answers below step s (V(root): of all of them), and
    step s gets ((V(s) - V(root)) + (V(s) - V(parent(s)))) / sqrt(|L(s)|), |L(s)| = answers below
    it (each shared step is trained once per answer: the square root damps that repetition).
    Returns, per answer, one advantage per step of its path."""
    if len(paths) != len(rewards) or any(not p for p in paths):
        raise ValueError("tree_step_advantages: one non-empty path per reward")
    below: dict = {}  # node id -> rewards of the answers below it
    for path, r in zip(paths, rewards):
        for node in path:
            below.setdefault(node, []).append(r)
    v = {node: sum(rs) / len(rs) for node, rs in below.items()}
    v_root = sum(rewards) / len(rewards)
    return [[((v[s] - v_root) + (v[s] - (v[path[k - 1]] if k else v_root))) / len(below[s]) ** 0.5
             for k, s in enumerate(path)] for path in paths]


def total_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, values: Tensor,
               rewards: Tensor, advantages: Tensor, mask: Tensor, c_ppo: float = 1.0,
               c_value: float = 1.0, c_kl: float = 0.05, loss: str = "cispo",
               eps_high: float = 5.0, eps: float = 0.2, agg: str = "token",
               ) -> tuple[Tensor, dict[str, float]]:
    """Blog's L_total = c_ppo L_policy + c_value L_value + c_KL D_KL, plus scalars for logging.

    advantages are per token [B,T] (value_advantages, or group_advantages broadcast over tokens);
    rewards [B] are the value targets; ref_logp=None drops the KL term (needs c_kl == 0).
    Defaults are the blog's table (c_ppo 1.0, c_value 1.0, c_KL 0.05, CISPO epsilon_high 5.0).
    """
    if loss == "cispo":
        policy = cispo_loss(logp, old_logp, advantages, mask, eps_high, agg)
    elif loss == "ppo":
        policy = ppo_clip_loss(logp, old_logp, advantages, mask, eps, agg)
    else:
        raise ValueError(f"total_loss: loss must be 'cispo' or 'ppo', got {loss!r}")
    if ref_logp is None:
        if c_kl != 0:
            raise ValueError("total_loss: c_kl != 0 needs ref_logp")
        kl = policy.new_zeros(())
    else:
        kl = kl_k3(logp, ref_logp, mask, agg)
    v_loss = value_loss(values, rewards, mask, agg)
    total = c_ppo * policy + c_value * v_loss + c_kl * kl
    valid = mask > 0
    ratio = torch.exp(torch.where(valid, logp.detach() - old_logp, 0.0))
    stats = {
        "total_loss": total.item(),
        "policy_loss": policy.item(),
        "value_loss": v_loss.item(),
        "kl": kl.item(),
        "clip_frac": clip_fraction(ratio, advantages.detach(), valid, loss, eps_high, eps).item(),
        "ratio_mean": _masked_mean(ratio, valid).item(),
        "advantage_mean": _masked_mean(advantages.detach(), valid).item(),
        "n_tokens": float(valid.sum().item()),
    }
    return total, stats
