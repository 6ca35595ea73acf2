"""The optimiser step shared by pretraining, SFT and RL: AdamW, a learning-rate schedule, a guarded update.

`guarded_step` is the one place where gradients reach the weights. It clips the global gradient norm
and refuses to step when the loss or the gradient norm is NaN/inf: the gradients are dropped, the
weights stay as they were, and the caller counts the skip (THOR-style RL on small models does hit the
occasional overflow; one bad batch must never poison the weights).
Limits: single parameter group (the trainers pass only trainable parameters); fp32 optimiser state.
"""

import math

import torch


def build_optimizer(parameters, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("no trainable parameters: check the LoRA / freezing options")
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay)


def scheduled_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0,
                 schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """Learning rate at `step` (0-based): linear warm-up, then constant or cosine down to min_ratio * lr."""
    if schedule not in ("constant", "cosine"):   # checked first: a typo must fail at step 0, not after warm-up
        raise ValueError(f"unknown schedule {schedule!r}: use constant or cosine")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def guarded_step(optimizer: torch.optim.Optimizer, loss_value: float, max_grad_norm: float = 1.0) -> tuple[bool, float]:
    """Clip and step unless the loss or the gradients are not finite. Returns (stepped, grad_norm)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm) if parameters else torch.zeros(())
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # FSDP2: a DTensor
    stepped = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped, grad_norm
