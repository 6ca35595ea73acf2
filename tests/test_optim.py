"""The shared optimiser step: learning-rate schedules and the guarded (NaN-proof, clipped) update."""

import math

import pytest
import torch

from thor_min.optim import build_optimizer, guarded_step, scheduled_lr, set_lr


# ----------------------------------------------------------------------------------------------
# scheduled_lr


def test_warmup_ramps_linearly_to_the_base_lr():
    lrs = [scheduled_lr(1.0, step, 100, warmup_steps=4) for step in range(5)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]), f"warm-up ramp wrong: {lrs}"


def test_constant_schedule_is_constant_after_warmup():
    lrs = {scheduled_lr(3e-4, step, 50, warmup_steps=5, schedule="constant") for step in range(5, 60)}
    assert lrs == {3e-4}, f"constant schedule varied: {sorted(lrs)}"


def test_cosine_starts_at_base_lr_after_warmup():
    lr = scheduled_lr(2.0, 10, 110, warmup_steps=10, schedule="cosine")
    assert lr == pytest.approx(2.0), f"cosine at the end of warm-up should be the base lr, got {lr}"


def test_cosine_ends_at_min_ratio():
    lr = scheduled_lr(2.0, 110, 110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    assert lr == pytest.approx(0.2), f"cosine at the last step should be min_ratio * lr, got {lr}"


def test_cosine_midpoint_is_halfway_between_base_and_floor():
    lr = scheduled_lr(1.0, 50, 100, schedule="cosine", min_ratio=0.2)
    assert lr == pytest.approx(0.2 + 0.8 * 0.5), f"cosine midpoint wrong: {lr}"


def test_cosine_is_clamped_past_the_end():
    lr = scheduled_lr(1.0, 500, 100, schedule="cosine", min_ratio=0.05)
    assert lr == pytest.approx(0.05), f"cosine past total_steps should stay at the floor, got {lr}"


def test_cosine_is_monotone_non_increasing():
    lrs = [scheduled_lr(1.0, step, 40, warmup_steps=3, schedule="cosine") for step in range(3, 41)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), f"cosine went up somewhere: {lrs}"


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule"):
        scheduled_lr(1.0, 10, 100, schedule="linear")


def test_unknown_schedule_raises_during_warmup_too():
    with pytest.raises(ValueError, match="unknown schedule"):
        scheduled_lr(1.0, 0, 100, warmup_steps=10, schedule="linaer")


# ----------------------------------------------------------------------------------------------
# build_optimizer / set_lr


def test_build_optimizer_without_trainable_parameters_raises():
    layer = torch.nn.Linear(3, 3)
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(layer.parameters(), lr=1e-3)


def test_build_optimizer_takes_only_trainable_parameters():
    layer = torch.nn.Linear(3, 3)
    layer.bias.requires_grad_(False)
    optimizer = build_optimizer(layer.parameters(), lr=1e-3)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is layer.weight, "frozen parameters must not reach the optimiser"


def test_set_lr_changes_every_group():
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    set_lr(optimizer, 0.125)
    assert [g["lr"] for g in optimizer.param_groups] == [0.125, 0.125], "set_lr missed a parameter group"


# ----------------------------------------------------------------------------------------------
# guarded_step


def _param_with_grad(grad):
    param = torch.nn.Parameter(torch.ones(len(grad)))
    param.grad = torch.tensor(grad, dtype=torch.float32)
    return param


@pytest.mark.parametrize("loss_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_skips_the_update(loss_value):
    param = _param_with_grad([0.1, -0.2])
    optimizer = torch.optim.SGD([param], lr=1.0)
    stepped, _ = guarded_step(optimizer, loss_value, max_grad_norm=1.0)
    assert not stepped, "a non-finite loss must not step"
    assert torch.equal(param.detach(), torch.ones(2)), "weights changed although the step was skipped"
    assert param.grad is None, "the bad gradients must be dropped"


def test_nan_gradient_skips_the_update():
    param = _param_with_grad([float("nan"), 1.0])
    optimizer = torch.optim.AdamW([param], lr=1.0)
    stepped, grad_norm = guarded_step(optimizer, 0.5, max_grad_norm=1.0)
    assert not stepped and not math.isfinite(grad_norm), f"NaN gradient stepped (norm {grad_norm})"
    assert torch.equal(param.detach(), torch.ones(2)), "weights changed on a NaN gradient"
    assert not optimizer.state, "a skipped step must not touch the optimiser state"


def test_inf_gradient_skips_the_update():
    param = _param_with_grad([float("inf"), 1.0])
    optimizer = torch.optim.SGD([param], lr=1.0)
    stepped, _ = guarded_step(optimizer, 0.5)
    assert not stepped and torch.equal(param.detach(), torch.ones(2)), "an inf gradient reached the weights"


def test_step_clips_the_gradient_norm():
    param = _param_with_grad([3.0, 4.0])   # norm 5
    optimizer = torch.optim.SGD([param], lr=1.0)
    stepped, grad_norm = guarded_step(optimizer, 1.0, max_grad_norm=1.0)
    assert stepped, "a finite step was skipped"
    assert grad_norm == pytest.approx(5.0), f"the returned norm should be the pre-clip norm, got {grad_norm}"
    expected = torch.tensor([1 - 0.6, 1 - 0.8])
    assert torch.allclose(param.detach(), expected, atol=1e-6), f"update not clipped to norm 1: {param.detach()}"


def test_small_gradient_is_not_clipped():
    param = _param_with_grad([0.3, 0.4])   # norm 0.5 < 1
    optimizer = torch.optim.SGD([param], lr=1.0)
    guarded_step(optimizer, 1.0, max_grad_norm=1.0)
    assert torch.allclose(param.detach(), torch.tensor([0.7, 0.6]), atol=1e-6), "a small gradient was rescaled"


def test_step_clears_gradients():
    param = _param_with_grad([0.3, 0.4])
    optimizer = torch.optim.SGD([param], lr=1.0)
    guarded_step(optimizer, 1.0)
    assert param.grad is None, "gradients must be cleared after a step"


def test_step_without_any_gradient_is_a_no_op():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    stepped, grad_norm = guarded_step(optimizer, 1.0)
    assert grad_norm == 0.0 and torch.equal(param.detach(), torch.ones(2)), "no gradient, yet something changed"
