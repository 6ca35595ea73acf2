"""Benchmarks: each prints a ratio against a baseline measured in the same run.

    python -m thor_min.bench logprobs   # fused chunked log-prob Function vs naive log_softmax
    python -m thor_min.bench rl-step    # one plain-CoT GRPO step: ours vs TRL's GRPOTrainer
    python -m thor_min.bench rollout    # our KV-cache engine vs model.generate / re-prefill loop
    python -m thor_min.bench sandbox    # fork-server sandbox vs a fresh python3 per cell

Timing lives here, never in tests. Each submodule exposes `main(argv)`.
"""
