"""losses.py against numbers worked out by hand here, in plain Python math."""

import math

import pytest
import torch

import losses

# A ragged batch: sequence 0 has 3 valid tokens, sequence 1 has 2 and one padded slot.
# 5 valid tokens in all: a token-level mean divides by 5 (a mean of per-sequence means would not).
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
N_TOK = 5
NAN, INF = float("nan"), float("inf")
# Ratios pi_theta/pi_old per valid token: 2, 1, 8, 0.5, 7 (8 and 7 lie above both caps, 5 and 6).
RATIOS = [2.0, 1.0, 8.0, 0.5, 7.0]
LOGP = [-1.0, -0.5, -2.0, -0.3, -1.5]
ADV = [1.0, 1.0, 1.0, -0.5, -0.5]


def batch(values, pad=NAN):
    """Lay 5 per-token numbers out as the [2, 3] ragged batch, `pad` in the padded slot."""
    return torch.tensor([values[:3], values[3:] + [pad]], dtype=torch.float32)


def cispo_inputs(pad=NAN):
    logp = batch(LOGP, pad).requires_grad_()
    old = batch([lp - math.log(r) for lp, r in zip(LOGP, RATIOS)], pad)
    return logp, old, batch(ADV, pad)


def valid_grad(g):
    """The 5 valid entries of a [2, 3] gradient, in batch order."""
    return g[MASK > 0].tolist()


# ---------------------------------------------------------------- token_logprobs


def test_token_logprobs_by_hand():
    # logits (0, ln 2, ln 3) -> softmax (1/6, 2/6, 3/6); 100 added everywhere changes nothing
    row = [0.0, math.log(2), math.log(3)]
    logits = torch.tensor([[row, [100 + x for x in row]]])
    out = losses.token_logprobs(logits, torch.tensor([[2, 0]]))
    assert out.dtype == torch.float32 and out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([math.log(3 / 6), math.log(1 / 6)], abs=1e-5)


def test_token_logprobs_bf16_logits_are_cast_to_float32():
    g = torch.Generator().manual_seed(0)
    # a large offset: log_softmax computed in bf16 would lose precision to it
    logits32 = torch.randn(2, 5, 50, generator=g) * 3 + 20
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    bf16 = logits32.to(torch.bfloat16)
    out = losses.token_logprobs(bf16, tokens)
    assert out.dtype == torch.float32
    # the cast is exact, so bf16 input gives exactly the float32 math on the same (rounded) logits
    ref = torch.log_softmax(bf16.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and matches the original float32 logits up to the bf16 rounding of the inputs
    torch.testing.assert_close(out, losses.token_logprobs(logits32, tokens), atol=0.25, rtol=0)
    # whereas log_softmax in bf16 itself is visibly coarser
    in_bf16 = torch.log_softmax(bf16, -1).gather(-1, tokens[..., None])[..., 0].float()
    assert (in_bf16 - ref).abs().max() > 1e-3


def test_token_logprobs_shape_error():
    with pytest.raises(ValueError, match="token_logprobs"):
        losses.token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- CISPO


def test_cispo_blog_bound_by_hand():
    logp, old, adv = cispo_inputs()
    loss = losses.cispo_loss(logp, old, adv, MASK)
    # w = min(ratio, 5) = 2, 1, 5, 0.5, 5
    # sum w*A*logp = 2*1*-1 + 1*1*-0.5 + 5*1*-2 + 0.5*-0.5*-0.3 + 5*-0.5*-1.5 = -8.675
    assert loss.item() == pytest.approx(-(-2.0 - 0.5 - 10.0 + 0.075 + 3.75) / N_TOK, abs=1e-5)
    assert loss.item() == pytest.approx(1.735, abs=1e-5)
    loss.backward()
    # d loss / d logp_t = -w_t A_t / 5 (the weight is a constant)
    expected = [-2 * 1 / 5, -1 * 1 / 5, -5 * 1 / 5, -0.5 * -0.5 / 5, -5 * -0.5 / 5]
    assert valid_grad(logp.grad) == pytest.approx(expected, abs=1e-6)
    assert logp.grad[1, 2].item() == 0.0


def test_cispo_minimax_reading_is_eps_high_plus_one_by_hand():
    logp, old, adv = cispo_inputs()
    loss = losses.cispo_loss(logp, old, adv, MASK, eps_high=6.0)
    # MiniMax-M1's cap 1 + eps_high at its eps_high 5: w = 2, 1, 6, 0.5, 6
    assert loss.item() == pytest.approx(-(-2.0 - 0.5 - 12.0 + 0.075 + 4.5) / N_TOK, abs=1e-5)
    loss.backward()
    expected = [-2 / 5, -1 / 5, -6 / 5, 0.25 / 5, 3 / 5]
    assert valid_grad(logp.grad) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("cap", [5.0, 6.0])
def test_cispo_weight_clips_above_the_cap_only(cap):
    ratios = torch.tensor([0.01, 0.5, cap - 0.1, cap + 0.1, 100.0])
    w = losses.cispo_weight(torch.log(ratios), torch.zeros(5), eps_high=cap)
    # no lower bound: small ratios pass untouched; above the cap the weight is the cap
    assert w.tolist() == pytest.approx([0.01, 0.5, cap - 0.1, cap, cap], rel=1e-5)
    assert not w.requires_grad


def test_cispo_weight_is_detached():
    logp, old, adv = cispo_inputs()
    old.requires_grad_()
    losses.cispo_loss(logp, old, adv, MASK).backward()
    # old_logp only enters through the detached weight: no gradient reaches it
    assert old.grad is None or torch.all(old.grad == 0)
    g1 = logp.grad.clone()
    # moving old_logp on the capped tokens (ratio 8 -> 80, 7 -> 70: still capped) leaves w,
    # hence the gradient, unchanged; a weight that carried gradient would change it
    logp2, old2, adv2 = cispo_inputs()
    with torch.no_grad():
        old2[0, 2] -= math.log(10)
        old2[1, 1] -= math.log(10)
    losses.cispo_loss(logp2, old2, adv2, MASK).backward()
    torch.testing.assert_close(logp2.grad, g1)


# ---------------------------------------------------------------- PPO clip


def test_ppo_clip_by_hand_and_zero_gradient_where_clipped():
    ratios = [2.0, 1.0, 1.1, 0.5, 1.5]
    logp = batch(LOGP).requires_grad_()
    old = batch([lp - math.log(r) for lp, r in zip(LOGP, ratios)])
    adv = batch(ADV)
    # eps 0.2, per token min(r A, clip(r, 0.8, 1.2) A):
    #   r=2,   A=1:    min(2, 1.2)       = 1.2    clipped  (gradient 0)
    #   r=1,   A=1:    min(1, 1)         = 1
    #   r=1.1, A=1:    min(1.1, 1.1)     = 1.1
    #   r=0.5, A=-0.5: min(-0.25, -0.4)  = -0.4   clipped  (gradient 0)
    #   r=1.5, A=-0.5: min(-0.75, -0.6)  = -0.75  unclipped (pessimistic side)
    loss = losses.ppo_clip_loss(logp, old, adv, MASK, eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 1.1 - 0.4 - 0.75) / N_TOK, abs=1e-5)
    loss.backward()
    # d(r A)/d logp = r A on the unclipped tokens
    expected = [0.0, -1.0 / 5, -1.1 / 5, 0.0, 0.75 / 5]
    assert valid_grad(logp.grad) == pytest.approx(expected, abs=1e-6)
    _, stats = losses.total_loss(logp, old, None, torch.zeros(2, 3), torch.zeros(2), adv, MASK,
                                 c_kl=0.0, loss="ppo", eps=0.2)
    assert stats["clip_frac"] == pytest.approx(2 / 5)


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    values = batch([0.5, -0.2, 0.1, 0.9, 0.0]).requires_grad_()
    rewards = torch.tensor([1.0, -0.5])
    # (V - r)^2: 0.25, 1.44, 0.81 | 1.96, 0.25 -> 4.71 / 5
    loss = losses.value_loss(values, rewards, MASK)
    assert loss.item() == pytest.approx(4.71 / 5, abs=1e-6)
    # a per-token target [B, T] gives the same
    per_token = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, INF]])
    assert losses.value_loss(values, per_token, MASK).item() == pytest.approx(4.71 / 5, abs=1e-6)
    loss.backward()
    # 2 (V - r) / 5
    assert valid_grad(values.grad) == pytest.approx([-0.2, -0.48, -0.36, 0.56, 0.2], abs=1e-6)
    assert values.grad[1, 2].item() == 0.0


# ---------------------------------------------------------------- k3 KL


def test_kl_k3_by_hand():
    # per-token ratio pi_ref/pi_theta = 2, 1, 0.5, 4, 0.25; k3 = r - ln r - 1
    ref_over_theta = [2.0, 1.0, 0.5, 4.0, 0.25]
    logp = batch(LOGP)
    ref = batch([lp + math.log(r) for lp, r in zip(LOGP, ref_over_theta)])
    k3 = [1 - math.log(2), 0.0, math.log(2) - 0.5, 3 - math.log(4), math.log(4) - 0.75]
    assert losses.kl_k3(logp, ref, MASK).item() == pytest.approx(sum(k3) / N_TOK, abs=1e-6)


def test_kl_k3_zero_iff_equal():
    logp = batch(LOGP)
    assert losses.kl_k3(logp, logp.clone(), MASK).item() == 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ref = logp + 0.3 * torch.randn(2, 3, generator=g)
        assert losses.kl_k3(logp, ref, MASK).item() > 0.0


def test_kl_k3_monte_carlo_matches_exact_kl_and_blog_direction_does_not():
    p = torch.tensor([0.7, 0.2, 0.1])   # pi_theta: the policy that samples
    q = torch.tensor([0.2, 0.3, 0.5])   # pi_ref
    # exact KL(p || q) = sum p ln(p / q) = 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2
    exact = 0.7 * math.log(3.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.2)
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = torch.log(p[idx])[None], torch.log(q[idx])[None]
    mask = torch.ones_like(logp)
    est = losses.kl_k3(logp, ref, mask).item()
    assert est == pytest.approx(exact, rel=0.02)
    # The blog's printed direction, x = pi_theta/pi_ref in x - ln x - 1, under the same samples
    # has mean E_p[p/q] - 1 - KL = chi^2(p||q) - KL, not KL:
    # sum p^2/q = 0.49/0.2 + 0.04/0.3 + 0.01/0.5 = 2.60333, so chi^2 - KL = 1.60333 - 0.63493
    x = torch.exp(logp - ref)
    blog = (x - torch.log(x) - 1).mean().item()
    chi2 = 0.49 / 0.2 + 0.04 / 0.3 + 0.01 / 0.5 - 1
    assert blog == pytest.approx(chi2 - exact, rel=0.02)
    assert abs(blog - exact) > 0.3 * exact


# ---------------------------------------------------------------- advantages


def test_value_advantages_r_minus_detached_value():
    values = batch([0.5, -0.2, 0.1, 0.9, 0.0]).requires_grad_()
    adv = losses.value_advantages(torch.tensor([1.0, -0.5]), values, MASK)
    # A_t = r - V(s_t): 1-0.5, 1+0.2, 1-0.1 | -0.5-0.9, -0.5-0 | padded -> 0
    expected = torch.tensor([[0.5, 1.2, 0.9], [-1.4, -0.5, 0.0]])
    torch.testing.assert_close(adv, expected)
    assert not adv.requires_grad


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, -0.5], [0.3, 0.3, 0.3, 0.3]])
    # group means 0.5, 0.25, 0.3
    centred = [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75], [0.0] * 4]
    torch.testing.assert_close(losses.group_advantages(rewards), torch.tensor(centred))
    with pytest.raises(ValueError, match="n_groups"):
        losses.group_advantages(torch.zeros(4))


# ---------------------------------------------------------------- total loss


@pytest.mark.parametrize("kind", ["cispo", "ppo"])
def test_total_loss_is_weighted_sum_of_parts(kind):
    logp, old, adv = cispo_inputs()
    ref = batch([lp + 0.2 for lp in LOGP])
    values = batch([0.5, -0.2, 0.1, 0.9, 0.0]).requires_grad_()
    rewards = torch.tensor([1.0, -0.5])
    total, stats = losses.total_loss(logp, old, ref, values, rewards, adv, MASK,
                                     c_ppo=0.7, c_value=0.3, c_kl=0.1, loss=kind)
    policy = (losses.cispo_loss(logp, old, adv, MASK) if kind == "cispo"
              else losses.ppo_clip_loss(logp, old, adv, MASK))
    v = losses.value_loss(values, rewards, MASK)
    kl = losses.kl_k3(logp, ref, MASK)
    weighted = 0.7 * policy.item() + 0.3 * v.item() + 0.1 * kl.item()
    assert total.item() == pytest.approx(weighted, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(policy.item())
    assert stats["value_loss"] == pytest.approx(4.71 / 5, abs=1e-6)
    # k3 with ln(pi_ref/pi_theta) = 0.2 on every token
    assert stats["kl"] == pytest.approx(math.exp(0.2) - 0.2 - 1, abs=1e-6)
    assert stats["total_loss"] == pytest.approx(total.item())
    assert stats["n_tokens"] == N_TOK
    if kind == "cispo":
        assert stats["clip_frac"] == pytest.approx(2 / 5)  # ratios 8 and 7 hit the cap 5
        assert stats["ratio_mean"] == pytest.approx(sum(RATIOS) / N_TOK, rel=1e-5)


def test_total_loss_without_reference():
    logp, old, adv = cispo_inputs()
    values, rewards = batch([0.0] * 5), torch.tensor([1.0, -0.5])
    total, stats = losses.total_loss(logp, old, None, values, rewards, adv, MASK, c_kl=0.0)
    assert stats["kl"] == 0.0
    assert total.item() == pytest.approx(1.735 + (3 * 1.0 + 2 * 0.25) / N_TOK, abs=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        losses.total_loss(logp, old, None, values, rewards, adv, MASK, c_kl=0.05)
    with pytest.raises(ValueError, match="loss"):
        losses.total_loss(logp, old, None, values, rewards, adv, MASK, c_kl=0.0, loss="grpo")


# ---------------------------------------------------------------- masks


def all_losses(logp, old, ref, values, adv, mask):
    rewards = torch.tensor([1.0, -0.5])
    return [
        losses.cispo_loss(logp, old, adv, mask),
        losses.cispo_loss(logp, old, adv, mask, eps_high=6.0),
        losses.ppo_clip_loss(logp, old, adv, mask),
        losses.value_loss(values, rewards, mask),
        losses.kl_k3(logp, ref, mask),
        losses.total_loss(logp, old, ref, values, rewards, adv, mask)[0],
        losses.total_loss(logp, old, ref, values, rewards, adv, mask, loss="ppo")[0],
    ]


@pytest.mark.parametrize("garbage", [NAN, INF, -INF, 1e30])
def test_padding_changes_nothing(garbage):
    def inputs(pad, extra):
        """The ragged batch with `pad` in its padded slot and `extra` padded columns appended."""
        cols = [[pad] * extra] * 2
        def mk(vals):
            tail = torch.tensor(cols).reshape(2, extra)
            return torch.cat([batch(vals, pad), tail], 1).requires_grad_()
        old = [lp - math.log(r) for lp, r in zip(LOGP, RATIOS)]
        ref = [lp + 0.3 for lp in LOGP]
        mask = torch.cat([MASK, torch.zeros(2, extra)], 1)
        return mk(LOGP), mk(old), mk(ref), mk([0.5, -0.2, 0.1, 0.9, 0.0]), mk(ADV), mask

    clean = inputs(0.0, 0)
    dirty = inputs(garbage, 2)
    for a, b in zip(all_losses(*clean), all_losses(*dirty)):
        assert torch.isfinite(b)
        assert b.item() == pytest.approx(a.item(), abs=1e-6)
        ga = torch.autograd.grad(a, [clean[0], clean[3]], allow_unused=True)
        gb = torch.autograd.grad(b, [dirty[0], dirty[3]], allow_unused=True)
        for x, y in zip(ga, gb):
            if x is None:
                continue
            # same gradient on the valid tokens, exactly zero (not NaN) on every padded one
            torch.testing.assert_close(y[:, :3][MASK > 0], x[MASK > 0])
            assert torch.all(y[:, :3][MASK == 0] == 0) and torch.all(y[:, 3:] == 0)


def test_shape_mismatch_is_a_clear_error():
    logp, old, adv = cispo_inputs()
    with pytest.raises(ValueError, match="advantages has shape"):
        losses.cispo_loss(logp, old, adv[:, :1], MASK)



def test_sequence_aggregation_weighs_every_sequence_alike_by_hand():
    # row 0: 3 valid tokens of x = 1, 2, 3; row 1: 1 valid token x = 10; row 2: none.
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]) > 0
    assert losses._masked_mean(x, valid, "token").item() == pytest.approx(16 / 4)
    assert losses._masked_mean(x, valid, "sequence").item() == pytest.approx((2 + 10) / 2)
    # CISPO at ratio 1 (w = 1): -mean(A * logp); sequence: -((0.5 * -1 + 0.5 * -3) / 2 + 2 * -1) / 2
    logp = torch.tensor([[-1.0, -3.0], [-1.0, 0.0]])
    adv = torch.tensor([[0.5, 0.5], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert losses.cispo_loss(logp, logp, adv, mask, agg="sequence").item() == pytest.approx(1.5)
    assert losses.cispo_loss(logp, logp, adv, mask).item() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="aggregation"):
        losses._masked_mean(x, valid, "batch")


def test_leave_one_out_advantages_by_hand():
    # rewards 1, 0, -1: each minus the mean of the other two
    assert losses.leave_one_out_advantages([1.0, 0.0, -1.0]) == pytest.approx([1.5, 0.0, -1.5])
    # = n / (n - 1) * (r - mean): 4 / 3 * (0.5 - 0.125) = 0.5
    assert losses.leave_one_out_advantages([0.5, 0.0, 0.0, 0.0])[0] == pytest.approx(0.5)
    assert losses.leave_one_out_advantages([0.7, 0.2]) == pytest.approx([0.5, -0.5])  # n = 2
    assert losses.leave_one_out_advantages([0.7]) == [0.0]  # nothing to compare with
    assert losses.leave_one_out_advantages([]) == []


def test_tree_step_advantages_by_hand():
    # a tree: a -> (a1: r 1, a2: r 0), b: r -1. V(root) = 0, V(a) = 0.5 over 2 answers.
    got = losses.tree_step_advantages([["a", "a1"], ["a", "a2"], ["b"]], [1.0, 0.0, -1.0])
    a = ((0.5 - 0) + (0.5 - 0)) / math.sqrt(2)  # shared step: global + local over sqrt(|L|)
    assert got[0] == pytest.approx([a, (1 - 0) + (1 - 0.5)])
    assert got[1] == pytest.approx([a, (0 - 0) + (0 - 0.5)])
    assert got[2] == pytest.approx([(-1 - 0) + (-1 - 0)])
    # a root mean that is not 0: rewards 1, 0.5 below "a", 0 alone; V(root) = 0.5, V(a) = 0.75
    got = losses.tree_step_advantages([["a", "x"], ["a", "y"], ["b"]], [1.0, 0.5, 0.0])
    a = ((0.75 - 0.5) + (0.75 - 0.5)) / math.sqrt(2)
    assert got[0] == pytest.approx([a, (1 - 0.5) + (1 - 0.75)])
    assert got[1] == pytest.approx([a, (0.5 - 0.5) + (0.5 - 0.75)])
    assert got[2] == pytest.approx([(0 - 0.5) + (0 - 0.5)])
    with pytest.raises(ValueError, match="one non-empty path per reward"):
        losses.tree_step_advantages([["a"], []], [1.0, 0.0])


def test_visit_weighted_advantages_by_hand():
    # rewards 1, 0, -1 (mean 0); visits 3, 1, 0: visited mean 2 -> weights 1.5, 0.5, 0
    assert losses.visit_weighted_advantages([1.0, 0.0, -1.0], [3, 1, 0]) == pytest.approx(
        [1.5 * 1.0, 0.5 * 0.0, 0.0])
    # the baseline is the mean of all answers, visited or not: 0.5 - mean(0.5, -0.5) = 0.5
    assert losses.visit_weighted_advantages([0.5, -0.5], [4, 0]) == pytest.approx([0.5, 0.0])
    # mean reward 0.125 over all four, visited mean (3 + 1 + 2) / 3 = 2
    assert losses.visit_weighted_advantages([1.0, -1.0, 0.5, 0.0], [3, 1, 0, 2]) == pytest.approx(
        [1.5 * 0.875, 0.5 * -1.125, 0.0, 1.0 * -0.125])
    assert losses.visit_weighted_advantages([0.3, 0.1], [0, 0]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="one visit count per reward"):
        losses.visit_weighted_advantages([0.3], [1, 2])


@pytest.mark.parametrize("kind", ["cispo", "ppo"])
def test_every_term_of_the_total_loss_honours_sequence_aggregation(kind):
    """agg="sequence" = each row's token mean, then the mean over rows: checked against the
    token-mean losses of each row alone (an independent path), on rows of 3 and 1 valid tokens
    whose token and sequence means differ."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    old = torch.tensor([[-1.2, -1.5, -0.5], [-0.1, -9.0, -9.0]])
    ref = torch.tensor([[-0.8, -2.5, -1.0], [-0.6, -9.0, -9.0]])
    values = torch.tensor([[0.1, 0.4, -0.2], [0.9, 0.0, 0.0]])
    rewards = torch.tensor([1.0, -1.0])
    adv = torch.tensor([[0.7, 0.7, 0.7], [-1.3, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    _, seq = losses.total_loss(logp, old, ref, values, rewards, adv, mask, loss=kind,
                               agg="sequence")
    _, tok = losses.total_loss(logp, old, ref, values, rewards, adv, mask, loss=kind)
    rows = [losses.total_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], values[i:i + 1],
                              rewards[i:i + 1], adv[i:i + 1], mask[i:i + 1], loss=kind)[1]
            for i in range(2)]
    for key in ("policy_loss", "value_loss", "kl", "total_loss"):
        assert seq[key] == pytest.approx((rows[0][key] + rows[1][key]) / 2), key
        assert seq[key] != pytest.approx(tok[key]), key  # the two readings differ here


def test_ppo_clip_fraction_counts_only_the_switched_off_gradients_by_hand():
    # PPO's clip holds a token back when ratio > 1 + eps with A > 0, or ratio < 1 - eps with A < 0
    ratio = torch.tensor([[1.5, 1.1, 0.5], [0.9, 0.5, 1.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 0.5, 0.0]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    # held: (1.5, +1) and (0.5, -1); not (1.1, +1), (0.9, -1) inside the range, (0.5, +0.5) with
    # A > 0, (1.5, 0) with A = 0
    got = losses.clip_fraction(ratio, adv, valid, "ppo", eps_high=5.0, eps=0.2)
    assert got.item() == pytest.approx(2 / 6)
    assert losses.clip_fraction(ratio * 4, adv, valid, "cispo", eps_high=5.0, eps=0.2).item() \
        == pytest.approx(2 / 6)  # CISPO: the weight at its cap (6.0 twice), whatever A


@pytest.mark.parametrize(("fn", "name"), [
    ("cispo_loss", "logp"), ("cispo_loss", "old_logp"), ("cispo_loss", "advantages"),
    ("ppo_clip_loss", "logp"), ("ppo_clip_loss", "old_logp"), ("ppo_clip_loss", "advantages"),
    ("value_loss", "values"), ("value_loss", "returns"), ("value_advantages", "values")])
def test_every_per_token_argument_is_shape_checked(fn, name):
    """Each [B, T] argument is checked against the mask, by name (one wrong shape at a time)."""
    mask = torch.ones(2, 3)
    good = {"logp": torch.zeros(2, 3), "old_logp": torch.zeros(2, 3),
            "advantages": torch.zeros(2, 3), "values": torch.zeros(2, 3),
            "returns": torch.zeros(2, 3), "rewards": torch.zeros(2)}
    args = {"cispo_loss": ("logp", "old_logp", "advantages"),
            "ppo_clip_loss": ("logp", "old_logp", "advantages"),
            "value_loss": ("values", "returns"), "value_advantages": ("rewards", "values")}[fn]
    bad = {k: (torch.zeros(2, 2) if k == name else good[k]) for k in args}
    with pytest.raises(ValueError, match=f"{fn}: {name} has shape \\(2, 2\\), expected \\(2, 3\\)"):
        getattr(losses, fn)(*bad.values(), mask)
