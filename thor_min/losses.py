"""Group-normalised advantages and THOR's clipped policy loss (PPO ratio, clip-higher, dual clip, NLL bonus).

What it does
    `group_advantages(rewards, groups)` turns per-sample rewards into GRPO advantages, (r - mean) / (std + eps)
    within each group, or r - mean (Dr.GRPO, `scale="none"`).
    `policy_loss(logp, old_logp, advantages, loss_mask)` is THOR's objective (THOR.md §4), per token t of sample b:
        ratio = exp(logp - old_logp)
        pg    = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))   clip-higher: eps_low 0.2, eps_high 0.28
        pg    = min(pg, -A * dual_clip)   for A < 0                               dual clip c = 3 caps pg at 3|A|
        loss  = pg + nll_alpha * (-logp) * [A > 0] + kl_beta * k3(ref, logp)     NLL on positive samples; KL off
    reduced over the tokens where `loss_mask` is true by one of
        token-mean : sum(loss) / num_tokens             tokens of the whole (mini-)batch weigh the same (THOR, DAPO)
        seq-mean   : sum_b(sum_t loss / tokens_b) / num_seqs   mean per sequence, then over sequences (original GRPO)
        dr-grpo    : sum(loss) / (num_seqs * dr_grpo_norm)     a constant normaliser, no length bias (Dr.GRPO)

Design
    * Gradient accumulation: pass `num_tokens` (token-mean) or `num_seqs` (seq-mean, dr-grpo) counted over the whole
      mini-batch, and each micro-batch's loss is its share of the mini-batch loss, so summing the micro-batch
      gradients gives exactly the mini-batch gradient. Left as None they are counted on the tensors given.
    * Masked tokens contribute exactly nothing: every input is replaced by 0 at masked positions *before* any
      arithmetic (`torch.where`), so NaN/inf garbage there cannot leak into the loss or its gradient.
    * The NLL bonus is part of the per-token loss, so it is normalised by the same aggregation as the PPO term.
    * Metrics are token means over this call's unmasked tokens, returned as Python floats (one sync for all).

Limits
    The sample std is the unbiased one (torch.std's default, as TRL and verl use); a group of one sample gets
    advantage 0. Advantages are per sample ([B]); per-token advantages are not supported.
"""

import torch

AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


def group_advantages(rewards, groups, eps=1e-6, scale="std"):
    """Group-normalised advantages [B] (float32).

    rewards [B]. groups: an int G (samples b*G ... b*G+G-1 form a group) or group ids [B] (any integers).
    scale="std": (r - mean) / (std + eps), std unbiased; scale="none": r - mean (Dr.GRPO).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # [B]
    if isinstance(groups, int):
        if groups <= 0 or rewards.numel() % groups:
            raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {groups}")
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // groups  # [B]
    else:
        group_ids = torch.as_tensor(groups, device=rewards.device)
        if group_ids.shape != rewards.shape:
            raise ValueError(f"group ids {tuple(group_ids.shape)} must match rewards {tuple(rewards.shape)}")
    _, group_index = torch.unique(group_ids, return_inverse=True)  # [B] in 0..num_groups-1
    num_groups = int(group_index.max()) + 1 if rewards.numel() else 0
    counts = torch.zeros(num_groups, device=rewards.device).index_add_(0, group_index, torch.ones_like(rewards))
    means = torch.zeros(num_groups, device=rewards.device).index_add_(0, group_index, rewards) / counts  # [G]
    centred = rewards - means[group_index]  # [B]
    if scale == "none":
        return centred
    squares = torch.zeros(num_groups, device=rewards.device).index_add_(0, group_index, centred**2)  # [G]
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()  # [G], 0 for a group of one
    return centred / (stds[group_index] + eps)


def _aggregate(per_token_loss, mask, aggregation, num_tokens, num_seqs, dr_grpo_norm):
    """Reduce a masked [B, T] loss (already 0 where masked) to a scalar; see the module docstring."""
    if aggregation == "token-mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return per_token_loss.sum() / max(float(denominator), 1.0)
    num_seqs = per_token_loss.shape[0] if num_seqs is None else num_seqs
    if aggregation == "seq-mean":
        tokens_per_seq = mask.sum(dim=1).clamp(min=1)  # [B]; an empty row contributes 0
        return (per_token_loss.sum(dim=1) / tokens_per_seq).sum() / max(float(num_seqs), 1.0)
    if aggregation == "dr-grpo":
        norm = per_token_loss.shape[1] if dr_grpo_norm is None else dr_grpo_norm
        return per_token_loss.sum() / (max(float(num_seqs), 1.0) * float(norm))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def k3_kl(log_p_sample, log_q):
    """Schulman's k3 estimator of KL(p_sample || q) per token: exp(log_q - log_p) - (log_q - log_p) - 1 >= 0."""
    log_ratio = log_q - log_p_sample
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    logp, old_logp, advantages, loss_mask, *, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
    aggregation="token-mean", nll_alpha=0.01, ref_logp=None, kl_beta=0.0, entropy=None,
    dr_grpo_norm=None, num_tokens=None, num_seqs=None,
):
    """THOR's policy loss; returns (loss scalar, metrics dict of Python floats).

    logp, old_logp, ref_logp, entropy [B, T] (the last two optional); advantages [B]; loss_mask [B, T]
    (bool or 0/1). dual_clip=None disables the dual clip. num_tokens / num_seqs: mini-batch normalisers for
    gradient accumulation (see the module docstring); dr_grpo_norm: the constant length (default T).
    """
    mask = loss_mask.bool()  # [B, T]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)  # [B, T], garbage at masked positions removed
    old_logp = torch.where(mask, old_logp.to(logp.dtype), zero)
    adv = advantages.to(logp.dtype)[:, None].expand_as(logp)  # [B, T]

    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_loss = torch.maximum(unclipped, clipped)  # [B, T]
    if dual_clip is not None:
        pg_loss = torch.where(adv < 0, torch.minimum(pg_loss, -adv * dual_clip), pg_loss)

    positive = mask & (adv > 0)  # [B, T] tokens of samples with positive advantage
    nll = torch.where(positive, -logp, zero)  # [B, T]
    per_token_loss = pg_loss + nll_alpha * nll
    kl_ref = None
    if ref_logp is not None:
        kl_ref = k3_kl(logp, torch.where(mask, ref_logp.to(logp.dtype), zero))  # [B, T]
        if kl_beta:
            per_token_loss = per_token_loss + kl_beta * kl_ref
    per_token_loss = torch.where(mask, per_token_loss, zero)
    loss = _aggregate(per_token_loss, mask, aggregation, num_tokens, num_seqs, dr_grpo_norm)

    metrics = _loss_metrics(
        loss, pg_loss, nll, ratio, log_ratio, adv, mask, positive, eps_low, eps_high, dual_clip, kl_ref, entropy
    )
    return loss, metrics


@torch.no_grad()
def _loss_metrics(loss, pg_loss, nll, ratio, log_ratio, adv, mask, positive, eps_low, eps_high, dual_clip,
                  kl_ref, entropy):
    """Token means over unmasked tokens of the loss pieces, clip fractions and KL estimates."""
    num_tokens = mask.sum().clamp(min=1)

    def token_mean(values):
        return torch.where(mask, values, 0).sum() / num_tokens

    clip_high = mask & (adv > 0) & (ratio > 1.0 + eps_high)  # PPO term flat: no gradient
    clip_low = mask & (adv < 0) & (ratio < 1.0 - eps_low)
    dual = mask & (adv < 0) & (ratio > dual_clip) if dual_clip is not None else torch.zeros_like(mask)
    values = {
        "loss": loss.detach(),
        "pg_loss": token_mean(pg_loss),
        "nll": torch.where(positive, nll, 0).sum() / positive.sum().clamp(min=1),
        "clip_frac_high": token_mean(clip_high.float()),
        "clip_frac_low": token_mean(clip_low.float()),
        "dual_clip_frac": token_mean(dual.float()),
        "approx_kl_old": token_mean(ratio - 1.0 - log_ratio),  # k3 estimate of KL(old || new)
        "ratio_mean": token_mean(ratio),
        "ratio_max": torch.where(mask, ratio, 0).max() if mask.any() else ratio.new_zeros(()),
        "num_tokens": mask.sum().float(),
    }
    if kl_ref is not None:
        values["kl_ref"] = token_mean(kl_ref)
    if entropy is not None:
        values["entropy"] = token_mean(entropy.to(ratio.dtype))
    names = list(values)
    floats = torch.stack([values[name].double() for name in names]).tolist()  # one device sync
    return dict(zip(names, floats))
