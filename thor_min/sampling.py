"""Token sampling: temperature, top-k, top-p and greedy, by inverse CDF with one uniform per row.

Why inverse CDF: the rollout engine samples one token for every live row at every step; on a CPU,
`torch.multinomial` or Gumbel noise over a `[rows, vocab]` tensor costs more than the tiny model's forward.
One uniform per row (drawn from that row's own random stream, so its draws do not depend on what else is in
the batch) and a `searchsorted` over the cumulative distribution is exact and cheap. The logits can: a CPU's
matmul may round a row differently in a batch of another size (measured on an Intel Ice Lake Xeon: 1 and 2 rows
against 3 or more), so a token can move to a neighbour when its uniform lies within that noise of a boundary.
The returned log-prob is always under softmax(logits / T), before top-k/top-p truncation: RL samples with
temperature only (THOR.md section 7), so for training rollouts it is exactly the behaviour policy.
"""

import torch


def sample_tokens(logits: torch.Tensor, config: "SamplingConfig", generator=None, *,
                  uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits [N, V]`; return (tokens [N], log-probs [N]).

    `uniform [N]` (values in [0, 1)) picks each row's token by inverse CDF; without it they are drawn from
    `generator`. The log-prob is under softmax(logits / T) (T = 1 for greedy), before any top-k/top-p truncation.
    """
    temperature = config.temperature if config.temperature > 0 else 1.0
    logprobs = torch.log_softmax(logits / temperature, dim=-1)                          # [N, V]
    if config.temperature <= 0:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = logprobs
        if config.top_k > 0:
            kth = filtered.topk(min(config.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf")).log_softmax(dim=-1)
        if config.top_p < 1.0:   # keep the most likely tokens until their mass reaches top_p (of what top-k kept)
            sorted_lp, order = filtered.sort(dim=-1, descending=True)
            mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
            drop = mass_before >= config.top_p
            drop[:, 0] = False                                                   # the top token always stays
            filtered = filtered.scatter(1, order, sorted_lp.masked_fill(drop, float("-inf")))
        # inverse-CDF sampling: one uniform per row (much cheaper on CPU than multinomial or Gumbel noise).
        # u < total strictly and a right-sided search land on a token with probability > 0, never a dropped one.
        cdf = filtered.exp().cumsum(dim=-1)                                           # [N, V]
        total = cdf[:, -1:]
        if uniform is None:
            uniform = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)
        uniform = uniform.to(cdf.dtype)[:, None] * total
        uniform = torch.minimum(uniform, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
