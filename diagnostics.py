"""What a run logs about itself besides the losses (blog: none; our guards against the failure
modes seen here): per batch, the items' own numbers (the search's depth, rollouts, terminal
backups) and the health of the update (entropy, advantage and value spread, completion length,
sampler/trainer log-prob gap); at each eval, mean@n and, in an mcts run, the search gain; and
the warnings a user should see at once (a skipped update, the KL drifting)."""

from __future__ import annotations

import sys

import torch

import countdown
import eval as evaluation
import mcts
from infrastructure import Shared
from sampler import TorchSampler


def batch_info(batch: list[dict]) -> dict[str, float]:
    """Batch means of the items' logged numbers (the same keys for every item of a method)."""
    keys = sorted(batch[0]["info"])
    return {k: sum(b["info"][k] for b in batch) / len(batch) for k in keys}


def batch_format(batch: list[dict], tokenizer) -> tuple[float, str]:
    """The share of the batch's completions that are well formatted, and the first malformed one
    ("" if none): a falling format rate is the first sign of a diverging policy."""
    texts = [tokenizer.decode(b["tokens"], skip_special_tokens=True) for b in batch]
    formatted = [countdown.is_well_formatted(t) for t in texts]
    return sum(formatted) / len(formatted), next((t for t, ok in zip(texts, formatted) if not ok), "")


def step_metrics(stats: dict, data: dict, batch: list[dict], tokenizer, step: int
                 ) -> tuple[dict[str, float], str]:
    """One trainer step's logged numbers, before the mean over ranks: the rows' reward and format
    rate, the losses, policy lag (trainer step minus the weight version that generated a
    row), clip share, gradient norm, health, and the items' own numbers -> (those, the first
    malformed completion or "")."""
    format_rate, malformed = batch_format(batch, tokenizer)
    lag = (step - data["versions"]).float()
    return {"train_reward": data["rewards"].mean().item(), "train_format_rate": format_rate,
            **{k: stats[k] for k in ("policy_loss", "value_loss", "kl")},
            "policy_lag": lag.mean().item(), "policy_lag_max": lag.max().item(),
            **{k: stats[k] for k in ("clip_frac", "grad_norm", "skipped_step", *HEALTH)},
            **batch_info(batch)}, malformed


HEALTH = ("entropy", "advantage_std", "value_mean", "value_start", "reward_std",
          "completion_len", "logp_gap")


def token_entropies(logits: torch.Tensor, valid: torch.Tensor, elements: int = 1 << 22
                    ) -> torch.Tensor:
    """The policy's entropy (nats) at each valid position of logits [B, T, V], in float32 a few
    positions at a time (`elements` logits per piece): a whole [B, T, V] float32 copy is
    gigabytes at a real vocabulary (151,936 for Qwen2.5), the cost losses.token_logprobs avoids."""
    flat = logits.reshape(-1, logits.shape[-1])  # a view: no copy
    positions = valid.reshape(-1).nonzero().squeeze(1)
    out = []
    for piece in positions.split(max(1, elements // logits.shape[-1])):
        log_p = torch.log_softmax(flat[piece].float(), dim=-1)
        out.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def health_stats(logits, logp, values, advantages, batch: dict) -> dict[str, float]:
    """What to watch for divergence, on the completion tokens: the policy's entropy
    (nats/token), the advantages' spread, V(s) overall and at the first completion state against
    the rewards it predicts, completion length, and mean |log pi_theta - log pi_old| (policy lag
    plus any sampler/trainer mismatch)."""
    mask = batch["mask"]
    valid = mask > 0
    n = valid.sum().clamp(min=1)

    def mean(x):
        return (torch.where(valid, x, 0.0).sum() / n).item()
    first = valid.float().argmax(dim=1)  # each row's first completion position
    adv = advantages[valid]
    return {"entropy": (token_entropies(logits, valid).sum() / n).item(),
            "advantage_std": adv.std().item() if adv.numel() > 1 else 0.0,
            "value_mean": mean(values),
            "value_start": values[torch.arange(len(first)), first].mean().item(),
            "reward_std": batch["rewards"].std().item() if len(first) > 1 else 0.0,
            "completion_len": mask.sum(1).mean().item(),
            "logp_gap": mean((logp - batch["old_logprobs"]).abs())}


def search_gain(sampler, problems: list, cfg: mcts.MCTSConfig, n: int, max_new_tokens: int,
                temperature: float) -> dict[str, float]:
    """The search measured on itself: the selected trajectory's reward minus the mean reward of
    n i.i.d. policy samples on the same problems (dense, as trained on; and exact success), both
    at the training temperature."""
    results = mcts.search(problems, sampler, cfg)
    prompts = [r.prompt_ids for r in results]
    outs = sampler.generate(prompts, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, stop=(countdown.ANSWER_CLOSE,))
    sample_dense = [countdown.dense_reward(c.text, p) for p, g in zip(problems, outs) for c in g]
    sample_exact = [countdown.sparse_reward(c.text, p) for p, g in zip(problems, outs) for c in g]
    selected = sum(r.reward for r in results) / len(results)
    exact = sum(countdown.sparse_reward(r.text, p) for r, p in zip(results, problems)) / len(results)
    return {"eval_search_reward": selected,
            "eval_sample_reward": sum(sample_dense) / len(sample_dense),
            "eval_search_gain": selected - sum(sample_dense) / len(sample_dense),
            "eval_search_success": exact,
            "eval_sample_success": sum(sample_exact) / len(sample_exact)}


def eval_row(policy, tokenizer, problems: list, n: int, temperature: float, max_new_tokens: int,
             seed: int, search: mcts.MCTSConfig | None = None, search_problems: int = 0
             ) -> dict[str, float]:
    """The trainer's eval (blog: mean@16 on the test problems) as a metrics row. The sampler has the
    same seed at every eval: evals differ by the weights, not the random stream. With a search
    config, also the search gain on the first search_problems problems (at its temperature)."""
    smp = TorchSampler(policy, tokenizer, seed=seed)
    r = evaluation.evaluate(smp, problems, n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, progress=False)
    row = {f"eval_mean_at_{n}": r["mean_at_n"], "eval_ci95": r["ci95"],
           "eval_format_rate": r["format_rate"], "eval_mean_len": r["mean_len"]}
    if search is not None and search_problems:
        row.update(search_gain(smp, problems[:search_problems], search, n=n,
                               max_new_tokens=max_new_tokens, temperature=search.temperature))
    return row


def warn(sh: Shared, step: int, message: str) -> None:
    """A warning the user sees now (stderr) and finds later (events.jsonl)."""
    print(f"train.py: warning: {message}", file=sys.stderr, flush=True)
    sh.log_q.put({"event": "warning", "step": step, "message": message})


class Alarms:
    """The trainer's warnings: every skipped update, and the first time the k3 KL to the start
    model passes `kl_warn` (0: never)."""

    def __init__(self, kl_warn: float):
        self.kl_warn, self.kl_warned, self.skipped = kl_warn, False, 0

    def check(self, sh: Shared, step: int, skipped_step: float, kl: float) -> None:
        if skipped_step:
            self.skipped += 1
            warn(sh, step, f"non-finite loss or gradient norm at step {step}: update skipped "
                           f"({self.skipped} skipped so far; lower --lr / --max-grad-norm?)")
        if self.kl_warn and kl > self.kl_warn and not self.kl_warned:
            self.kl_warned = True
            warn(sh, step, f"KL to the start model {kl:.3f} > --kl-warn {self.kl_warn} at step "
                           f"{step}: the policy is drifting (lower --lr / --max-grad-norm?)")
