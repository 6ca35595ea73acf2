"""The stage code of one test scenario, run alone (world size 1) or under `torchrun --nproc_per_node 2`.

    python tests/distributed_worker.py parity OUT          # or: torchrun --standalone --nproc_per_node 2 ...
    python tests/distributed_worker.py sft OUT [--resume] [--kill-rank1-at STEP] [--steps N]

`parity` writes, from rank 0 only: sft.pt, sft-full.pt and rl.pt (the parameters after one SFT step with LoRA,
one of full fine-tuning, and one RL step of full fine-tuning on a mixed trajectory + step-level batch; full
fine-tuning is FSDP2-sharded on 2 ranks), rollouts.json (sampled tokens), and a TIRGen and an evaluation run's
output directories. `sft` trains 6 full fine-tuning SFT steps (FSDP2 on 2 ranks) with a checkpoint per step;
rank 1 can SIGKILL itself after a step (the no-hang test). tests/test_distributed.py compares the outputs.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from thor_min import distributed, tasks, tiny
from thor_min.ablation import stage_eval
from thor_min.config import override, preset_for
from thor_min.lora import apply_lora
from thor_min.metrics import MetricsLog
from thor_min.models import encode_prompt
from thor_min.optim import build_optimizer
from thor_min.rl import RLConfig, attach_old_logprobs, build_samples, train_on_samples
from thor_min.rollout import RolloutEngine, RolloutRequest, SamplingConfig
from thor_min.run_context import Run, save_policy
from thor_min.sandbox import Sandbox
from thor_min.sft import SFTConfig, full_text_examples, train_sft
from thor_min.tirgen import RuleCritic, TIRGenConfig
from thor_min.tirgen_run import run_tirgen

SIZE = tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2)


def tiny_model(seed: int = 0):
    tokenizer = tiny.build_tokenizer()
    return tiny.build_model(tokenizer, SIZE, seed=seed), tokenizer


def whole_weights(model) -> dict:
    """Every weight, whole (gathered from the ranks when FSDP2 shards the model; every rank must call this)."""
    return {name: tensor.detach().clone() for name, tensor in distributed.full_weights(model).items()}


@distributed.rank_zero_writes
def save(path: Path, value) -> None:
    torch.save(value, path) if path.suffix == ".pt" else path.write_text(json.dumps(value))


def sft_step(out: Path) -> None:
    """One SFT step with LoRA adapters (randomly initialised on each rank, then rank 0's broadcast)."""
    model, tokenizer = tiny_model()
    apply_lora(model, 4, 8.0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:                          # non-zero B: A gets a gradient too
            torch.nn.init.normal_(parameter, std=0.02)
    distributed.broadcast_parameters(model)
    examples = full_text_examples(tokenizer, tasks.train_split(10))
    config = SFTConfig(lr=1e-3, max_steps=1, batch_size=10, micro_batch_tokens=200, eval_every=1, seed=0)
    train_sft(model, tokenizer, examples, [], config, log=distributed.RankZeroOnly(MetricsLog(out / "sft-log")))
    save(out / "sft.pt", {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def sft_full_step(out: Path) -> None:
    """One SFT step of full fine-tuning: FSDP2 shards parameters, gradients and AdamW state on 2 ranks, and
    the rank with fewer micro-batches runs zero-weight passes (3 examples over 2 ranks, one per micro-batch)."""
    model, tokenizer = tiny_model(seed=3)
    distributed.prepare_training(model, shard_parameters=True)
    local = lambda tensor: tensor.to_local() if hasattr(tensor, "to_local") else tensor
    save(out / "sharding.json", {"local": sum(local(p).numel() for p in model.parameters()),   # rank 0's share
                                 "whole": sum(p.numel() for p in model.parameters())})
    examples = full_text_examples(tokenizer, tasks.train_split(3))
    config = SFTConfig(lr=1e-3, max_steps=1, batch_size=3, micro_batch_tokens=60, eval_every=1, seed=0)
    train_sft(model, tokenizer, examples, examples[:1], config,
              log=distributed.RankZeroOnly(MetricsLog(out / "sft-full-log")))
    save(out / "sft-full.pt", whole_weights(model))


def rl_step(out: Path, sandbox) -> None:
    """Sample 3 groups of 4 (sharded by request), build a mixed batch with step-level continuations of
    half of each trajectory, then one RL step (old log-probs, 2 minibatches) of full fine-tuning."""
    model, tokenizer = tiny_model(seed=1)
    distributed.prepare_training(model, shard_parameters=True)
    engine = distributed.ShardedEngine(RolloutEngine(model.eval(), tokenizer, sandbox))
    problems = tasks.train_split(3)
    requests = [RolloutRequest(encode_prompt(tokenizer, "tiny", p.question, tools=True), 4) for p in problems]
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, max_tool_calls=1, batch_size=5)
    rollouts = engine.generate(requests, sampling, seed=7)
    prefixes = [r.prompt_ids + r.completion_ids[:len(r.completion_ids) // 2] for r in rollouts[::4]]
    steps = engine.generate([RolloutRequest(p, 3) for p in prefixes], sampling, seed=8)
    save(out / "rollouts.json", [r.completion_ids for r in rollouts + steps])
    rewards = [float(i % 2) for i in range(4)]
    samples = build_samples([(rollouts[i:i + 4], rewards) for i in range(0, 12, 4)],
                            [(steps[i:i + 3], [1.0, 0.0, 0.0]) for i in range(0, 9, 3)])
    config = RLConfig(minibatches=2, micro_batch_tokens=160)
    optimizer = build_optimizer(model.parameters(), 1e-3)
    attach_old_logprobs(model, samples, config, tokenizer.pad_token_id)
    train_on_samples(model, optimizer, samples, config, tokenizer.pad_token_id, seed=0)
    save(out / "rl.pt", whole_weights(model))


def tirgen_and_eval(out: Path, sandbox) -> None:
    """TIRGen (rule critic) on 6 problems x 2 attempts, then the eval stage of a run whose base is this model."""
    model, tokenizer = tiny_model(seed=2)
    engine = distributed.ShardedEngine(RolloutEngine(model.eval(), tokenizer, sandbox))
    config = TIRGenConfig(attempts=2, step_tokens=12, max_chunks=3, batch_size=5, code_filter="none", seed=0)
    run_tirgen(out / "tirgen", engine, RuleCritic(sandbox), tasks.train_split(6), config, "tiny", problems_per_round=4)
    # 4 problems x 2 samples in batches of 4 rows: each rank's share is one batch of one process (a row's logits
    # are bitwise equal only in batches of the same rows; MKL on an Intel Ice Lake Xeon rounds 2 rows otherwise)
    run = Run(preset=override(preset_for("tiny"), eval_problems=4, eval_samples=2, eval_max_new_tokens=24,
                              rollout_batch=4), out=out / "run")
    save_policy(run, model, tokenizer, "base")
    stage_eval(run)


def sft_run(out: Path, resume: bool, kill_at: int | None, total_steps: int = 6) -> None:
    """`total_steps` SFT steps, a checkpoint after each; with `kill_at`, rank 1 SIGKILLs itself after that step."""
    model, tokenizer = tiny_model()
    distributed.prepare_training(model, shard_parameters=True)
    examples = full_text_examples(tokenizer, tasks.train_split(24))
    config = SFTConfig(lr=1e-3, max_steps=total_steps, batch_size=4, eval_every=1, checkpoint_every=1, seed=0)
    steps = iter(range(1, 100))

    def monitor() -> dict:   # called after every step (eval_every=1)
        if kill_at is not None and next(steps) == kill_at and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    train_sft(model, tokenizer, examples, [], config, log=distributed.RankZeroOnly(MetricsLog(out)),
              checkpoint_dir=out / "checkpoints", resume=resume, monitor=monitor)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("parity", "sft"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-rank1-at", type=int)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    distributed.setup(timeout_minutes=1.0)
    if args.mode == "parity":
        parity(args.out)
    else:
        sft_run(args.out, args.resume, args.kill_rank1_at, args.steps)
    distributed.teardown()


def parity(out: Path) -> None:
    """Every parity scenario; the global RNGs are seeded per rank (ranks differ unless the code makes them
    agree) and restored afterwards (the 1-process reference runs inside pytest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # as each torchrun rank (OMP_NUM_THREADS=1): same float kernels
    try:
        with torch.random.fork_rng():
            torch.manual_seed(100 + distributed.rank())
            out.mkdir(parents=True, exist_ok=True)
            sft_step(out)
            sft_full_step(out)
            with Sandbox(workers=1, timeout=5.0) as sandbox:
                rl_step(out, sandbox)
                tirgen_and_eval(out, sandbox)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
