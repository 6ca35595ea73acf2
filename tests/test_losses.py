"""Tests for thor_min.losses against hand-computed fixtures. Run: pytest tests/test_losses.py

The policy-loss fixture (B = 2 samples, T = 4 tokens, last token of sample 1 masked):
    sample 0, A = +1.5, ratios [1.0, 1.5, 0.5, 1.2] -> pg = [-1.5, -1.92 (clip high), -0.75, -1.8]
    sample 1, A = -0.5, ratios [1.0, 0.5, 4.0, --]  -> pg = [0.5, 0.4 (clip low), 1.5 (dual clip of 2.0), --]
    sum pg = -5.97 + 2.4 = -3.57 over 7 tokens; NLL on sample 0: -(-1 - 2 - 0.5 - 0.5) = 4.0
"""

import math

import pytest
import torch

from thor_min.losses import group_advantages, k3_kl, policy_loss

RATIOS = torch.tensor([[1.0, 1.5, 0.5, 1.2], [1.0, 0.5, 4.0, 1.0]], dtype=torch.float64)
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -0.5], [-0.3, -1.0, -2.0, -1.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.5, -0.5], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
PG_SUM, NLL_SUM, NUM_TOKENS = -3.57, 4.0, 7


def fixture(requires_grad=False):
    logp = LOGP.clone().requires_grad_(requires_grad)
    old_logp = LOGP - RATIOS.log()  # so that exp(logp - old_logp) = RATIOS
    return logp, old_logp, ADVANTAGES.clone(), MASK.clone()


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_std_scaling_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    third = math.sqrt(3) / 2  # 0.5 / sqrt(1/3)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, third, third, -third, -third])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5, msg="(r - mean) / (unbiased std + eps) wrong")


def test_group_advantages_dr_grpo_is_mean_centred_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, scale="none")
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(adv, expected, msg="Dr.GRPO advantages must be r - mean")


def test_group_advantages_with_unordered_group_ids_matches_group_size():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    by_size = group_advantages(rewards, 3)
    group_ids = torch.tensor([9, 9, 9, 2, 2, 2])
    torch.testing.assert_close(group_advantages(rewards, group_ids), by_size, msg="ids and size disagree")
    shuffled = torch.tensor([3, 0, 4, 1, 5, 2])
    torch.testing.assert_close(
        group_advantages(rewards[shuffled], group_ids[shuffled]), by_size[shuffled], msg="order of samples matters"
    )


def test_group_advantages_constant_group_and_singleton_are_zero():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.5]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(adv, torch.zeros(4)), f"equal rewards / a single sample must give 0, got {adv.tolist()}"


def test_group_advantages_rejects_bad_group_size():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


# ----------------------------------------------------------------------------- policy loss values


def test_token_mean_ppo_loss_hand_value():
    loss, _ = policy_loss(*fixture(), nll_alpha=0.0)
    assert loss.item() == pytest.approx(PG_SUM / NUM_TOKENS, abs=1e-9), "token-mean PPO loss wrong"


def test_token_mean_with_nll_bonus_hand_value():
    loss, metrics = policy_loss(*fixture(), nll_alpha=0.01)
    assert loss.item() == pytest.approx((PG_SUM + 0.01 * NLL_SUM) / NUM_TOKENS, abs=1e-9), "NLL bonus wrong"
    assert metrics["nll"] == pytest.approx(NLL_SUM / 4, abs=1e-9), "nll metric is the mean over positive tokens"


def test_seq_mean_hand_value():
    loss, _ = policy_loss(*fixture(), aggregation="seq-mean", nll_alpha=0.01)
    sample_0 = (-1.5 - 1.92 - 0.75 - 1.8 + 0.01 * NLL_SUM) / 4
    sample_1 = (0.5 + 0.4 + 1.5) / 3
    assert loss.item() == pytest.approx((sample_0 + sample_1) / 2, abs=1e-9), "seq-mean loss wrong"


def test_dr_grpo_constant_normaliser_hand_value():
    loss, _ = policy_loss(*fixture(), aggregation="dr-grpo", nll_alpha=0.0, dr_grpo_norm=10)
    assert loss.item() == pytest.approx(PG_SUM / (2 * 10), abs=1e-9), "dr-grpo must divide by B * norm"


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(*fixture(), aggregation="mean")


def test_dual_clip_off_uses_plain_clip_higher():
    loss, _ = policy_loss(*fixture(), nll_alpha=0.0, dual_clip=None)
    assert loss.item() == pytest.approx((PG_SUM - 1.5 + 2.0) / NUM_TOKENS, abs=1e-9), "without dual clip pg = 2.0"


def test_k3_kl_to_reference_adds_beta_times_k3():
    logp, old_logp, adv, mask = fixture()
    ref_logp = logp.clone()
    ref_logp[0, 0] += math.log(2.0)  # k3 = 2 - ln 2 - 1 on that token, 0 elsewhere
    base, _ = policy_loss(logp, old_logp, adv, mask, nll_alpha=0.0)
    with_kl, metrics = policy_loss(logp, old_logp, adv, mask, nll_alpha=0.0, ref_logp=ref_logp, kl_beta=0.1)
    k3 = 2.0 - math.log(2.0) - 1.0
    assert with_kl.item() - base.item() == pytest.approx(0.1 * k3 / NUM_TOKENS, abs=1e-9), "KL term wrong"
    assert metrics["kl_ref"] == pytest.approx(k3 / NUM_TOKENS, abs=1e-9), "kl_ref metric wrong"


def test_kl_is_off_by_default_even_with_a_reference():
    logp, old_logp, adv, mask = fixture()
    base, _ = policy_loss(logp, old_logp, adv, mask)
    with_ref, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=logp - 1.0)
    assert with_ref.item() == base.item(), "kl_beta defaults to 0: a reference must not change the loss"


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    values = k3_kl(torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.0, -0.5, -3.0]))
    assert values[0].item() == 0.0 and (values[1:] > 0).all(), f"k3 must be 0 iff equal, got {values.tolist()}"


# ----------------------------------------------------------------------------- gradients and masking


def test_clipped_tokens_get_zero_gradient_and_unclipped_get_minus_a_ratio():
    logp, old_logp, adv, mask = fixture(requires_grad=True)
    loss, _ = policy_loss(logp, old_logp, adv, mask, nll_alpha=0.0)
    loss.backward()
    expected = torch.tensor([[-1.5, 0.0, -0.75, -1.8], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64) / NUM_TOKENS
    torch.testing.assert_close(logp.grad, expected, msg="d loss / d logp = -A * ratio / N, 0 where clipped")


def test_masked_tokens_contribute_exactly_nothing():
    logp, old_logp, adv, mask = fixture()
    reference, _ = policy_loss(logp, old_logp, adv, mask)
    garbage_logp = logp.clone()
    garbage_logp[1, 3] = float("nan")
    garbage_old = old_logp.clone()
    garbage_old[1, 3] = float("inf")
    garbage_logp.requires_grad_(True)
    loss, _ = policy_loss(garbage_logp, garbage_old, adv, mask)
    loss.backward()
    assert loss.item() == reference.item(), "a masked token changed the loss"
    assert garbage_logp.grad[1, 3].item() == 0.0, "a masked token received a gradient"
    assert torch.isfinite(garbage_logp.grad).all(), "NaN leaked into the gradient"


def test_masked_entropy_metric_ignores_masked_positions():
    logp, old_logp, adv, mask = fixture()
    entropy = torch.ones_like(logp)
    entropy[1, 3] = float("nan")
    _, metrics = policy_loss(logp, old_logp, adv, mask, entropy=entropy)
    assert metrics["entropy"] == 1.0, f"entropy mean must use unmasked tokens only, got {metrics['entropy']}"


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "dr-grpo"])
def test_micro_batches_with_global_normaliser_sum_to_full_batch(aggregation):
    logp, old_logp, adv, mask = fixture(requires_grad=True)
    full, _ = policy_loss(logp, old_logp, adv, mask, aggregation=aggregation)
    full_grad = torch.autograd.grad(full, logp)[0]
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 1), slice(1, 2)):
        part, _ = policy_loss(
            logp[rows], old_logp[rows], adv[rows], mask[rows], aggregation=aggregation,
            num_tokens=int(mask.sum()), num_seqs=2, dr_grpo_norm=4,
        )
        total = total + part
    assert total.item() == pytest.approx(full.item(), abs=1e-12), f"{aggregation}: micro-batch sum differs"
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0], full_grad, msg="micro-batch grads differ")


def test_empty_mask_gives_zero_loss():
    logp, old_logp, adv, _ = fixture()
    loss, metrics = policy_loss(logp, old_logp, adv, torch.zeros_like(MASK))
    assert loss.item() == 0.0 and metrics["num_tokens"] == 0.0, "an empty mask must give loss 0"


# ----------------------------------------------------------------------------- metrics


def test_clip_fraction_metrics_hand_values():
    _, metrics = policy_loss(*fixture())
    assert metrics["clip_frac_high"] == pytest.approx(1 / 7), "one token above 1 + eps_high with A > 0"
    assert metrics["clip_frac_low"] == pytest.approx(1 / 7), "one token below 1 - eps_low with A < 0"
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 7), "one token above c = 3 with A < 0"
    assert metrics["ratio_max"] == pytest.approx(4.0), "the masked ratio must not be the max"


def test_approx_kl_to_old_hand_value():
    _, metrics = policy_loss(*fixture())
    unmasked = [1.0, 1.5, 0.5, 1.2, 1.0, 0.5, 4.0]
    expected = sum(r - 1 - math.log(r) for r in unmasked) / 7
    assert metrics["approx_kl_old"] == pytest.approx(expected, abs=1e-9), "k3 KL(old || new) wrong"


def test_metrics_are_python_floats():
    _, metrics = policy_loss(*fixture(), entropy=torch.ones(2, 4))
    assert all(type(value) is float for value in metrics.values()), f"non-float metric in {metrics}"
