"""Bench: one plain-CoT GRPO step of ours vs TRL's `GRPOTrainer`, same model, prompts, G, lengths and updates.

Run `python -m thor_min.bench rl-step [--prompts P --group G --new-tokens N --minibatches M ...]` (needs TRL:
`pip install -e .[bench]`). Both sides start from the same weights: the tiny preset's model
(`thor_min.tiny.build_model`, ~1.1 M parameters) fitted for a few seconds (`fit_texts`) to the reference answers of
the P prompts, so that at T = 1 it writes answers of varied length that end with EOS, some right and some wrong.
One step on each side = sample G completions of each of the P prompts (at most N new tokens, T = 1, no top-k/top-p,
no tools), grade them with the same reward (`grade_batch` against the gold answers), group-normalised advantages,
then M optimiser steps (AdamW, lr 1e-4, clip 0.2/0.28, no KL, no reference model) over minibatches of P*G/M:

- ours: `RolloutEngine.generate` (KV-cache sampler), `grade_batch`, `rl.build_samples` and `rl.train_on_samples`
  (old log-probs of the later minibatches scored before the first update, length-bucketed micro-batches), i.e.
  `rl.rl_step` without its keep-filters: every group is trained, as TRL trains every group;
- TRL: `GRPOTrainer` with `num_generations=G`, `per_device_train_batch_size=P*G/M`, `steps_per_generation=M`,
  `gradient_accumulation_steps=1` (one generation of P*G completions, then M optimiser steps; TRL scores old
  log-probs because it reuses the generation), `max_completion_length=N`, no vLLM, fp32 on the CPU, the same
  thread count. Its step time is the wall clock from the end of one generation cycle to the end of the next
  (generation through `model.generate`, reward, TRL's bookkeeping and logging, M updates); trainer set-up and the
  first (warm-up) cycle are excluded.
Timing: best of `--repeats` steps per side after a warm-up step. Both sides print the mean completion length,
so the work is comparable (the policies drift apart after their first update, so later steps differ a little).
Limits: a ~1 M-parameter model on a CPU, where per-step overhead dominates; on a GPU with a real model
generation and the backward pass weigh differently.
"""

import argparse
import copy
import tempfile
import time

import torch

from thor_min import tasks, tiny
from thor_min.bench.rollout import fit_texts
from thor_min.grader import grade_batch
from thor_min.models import build_prompt
from thor_min.optim import build_optimizer
from thor_min.rl import RLConfig, build_samples, train_on_samples, trajectory_config
from thor_min.rollout import RolloutEngine, RolloutRequest

INSTALL_HINT = "TRL is missing: pip install -e '.[bench]'  (or: pip install trl==1.16.0 accelerate)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m thor_min.bench rl-step", description=__doc__.split("\n")[0])
    step = parser.add_argument_group("the RL step (both sides)")
    step.add_argument("--prompts", type=int, default=8, help="prompts per step P")
    step.add_argument("--group", type=int, default=8, help="samples per prompt G")
    step.add_argument("--new-tokens", type=int, default=160, help="max new tokens N per completion")
    step.add_argument("--minibatches", type=int, default=2, help="optimiser steps M per generation")
    step.add_argument("--repeats", type=int, default=3, help="timed steps per side after a warm-up (best is kept)")
    model = parser.add_argument_group("model")
    model.add_argument("--fit-steps", type=int, default=40, help="steps fitting the fresh model to the references "
                       "(0 = random weights: every completion runs to N tokens)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides (default: 1)")
    runtime.add_argument("--seed", type=int, default=0, help="random seed")
    runtime.add_argument("--skip-trl", action="store_true", help="time only our step")
    args = parser.parse_args(argv)
    for name in ("prompts", "group", "new_tokens", "minibatches", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.prompts * args.group) % args.minibatches:
        parser.error(f"P*G = {args.prompts * args.group} rows do not split into {args.minibatches} equal minibatches")
    return args


def bench_model(problems, fit_steps: int, seed: int):
    """The tiny preset's tokenizer and model, fitted `fit_steps` steps to the problems' reference answers."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=seed)
    if fit_steps > 0:
        fit_texts(model, tokenizer, [build_prompt("tiny", p.question, tools=False) + p.reference for p in problems],
                  steps=fit_steps, seed=seed)
    return model.eval(), tokenizer


def rl_config(args) -> RLConfig:
    return RLConfig(prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens, tools=False,
                    step_level=False, minibatches=args.minibatches, micro_batch_tokens=8192, lr=1e-4,
                    batch_size=args.prompts * args.group, seed=args.seed)


def our_step(model, tokenizer, engine, optimizer, problems, config: RLConfig, seed: int) -> list[int]:
    """Sample, grade, advantages, `minibatches` updates; returns the completion lengths."""
    requests = [RolloutRequest(tokenizer.encode(build_prompt("tiny", p.question, tools=False)), config.group_size)
                for p in problems]
    rollouts = engine.generate(requests, trajectory_config(config), seed=seed)
    rewards = [float(ok) for ok in grade_batch([r.text for r in rollouts], [problems[r.request].golds for r in rollouts])]
    groups = [(rollouts[i:i + config.group_size], rewards[i:i + config.group_size])
              for i in range(0, len(rollouts), config.group_size)]
    train_on_samples(model, optimizer, build_samples(groups, []), config, tokenizer.pad_token_id, seed=seed)
    return [len(r.completion_ids) for r in rollouts]


def time_ours(model, tokenizer, problems, args) -> tuple[float, float]:
    """(best step seconds, mean completion tokens) of our step."""
    config = rl_config(args)
    engine = RolloutEngine(model, tokenizer)
    optimizer = build_optimizer(model.parameters(), config.lr, weight_decay=0.0, betas=(0.9, 0.999))
    times, lengths = [], []
    for step in range(args.repeats + 1):
        started = time.perf_counter()
        lengths += our_step(model, tokenizer, engine, optimizer, problems, config, seed=args.seed + step)
        times.append(time.perf_counter() - started)
    return min(times[1:]), sum(lengths) / len(lengths)


def time_trl(model, tokenizer, problems, args) -> tuple[float, float]:
    """(best generation-cycle seconds, mean completion tokens) of TRL's GRPOTrainer on the same step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    lengths: list[int] = []

    def reward(prompts, completions, golds, **_):
        lengths.extend(len(tokenizer.encode(c)) for c in completions)
        return [float(ok) for ok in grade_batch(completions, golds)]

    class CycleTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    rows = args.prompts * args.group
    dataset = Dataset.from_list([{"prompt": build_prompt("tiny", p.question, tools=False), "golds": p.golds}
                                 for p in problems] * (args.repeats + 1))
    timer = CycleTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=rows // args.minibatches,
                            gradient_accumulation_steps=1, steps_per_generation=args.minibatches,
                            num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0,
                            top_p=1.0, top_k=0, learning_rate=1e-4, adam_beta2=0.999, weight_decay=0.0,
                            lr_scheduler_type="constant", max_grad_norm=1.0, beta=0.0, epsilon=0.2,
                            epsilon_high=0.28, loss_type="dapo", num_iterations=1, use_vllm=False,
                            max_steps=args.minibatches * (args.repeats + 1), shuffle_dataset=False, use_cpu=True,
                            bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=10_000,
                            disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    cycle_ends = timer.ends[args.minibatches - 1::args.minibatches]
    times = [b - a for a, b in zip(cycle_ends, cycle_ends[1:])]
    return min(times), sum(lengths) / max(len(lengths), 1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = tasks.train_split(args.prompts, seed=tasks.DEFAULT_SEED + args.seed)
    model, tokenizer = bench_model(problems, args.fit_steps, args.seed)
    trl_model = copy.deepcopy(model)
    print(f"rl step: P={args.prompts} prompts x G={args.group}, <= {args.new_tokens} new tokens, "
          f"{args.minibatches} optimiser steps, plain CoT, fp32, threads={torch.get_num_threads()}")
    ours, our_length = time_ours(model, tokenizer, problems, args)
    print(f"ours: {ours:.2f} s/step (mean completion {our_length:.0f} tokens)")
    if args.skip_trl:
        return 0
    try:
        import trl
    except ImportError:
        print(INSTALL_HINT)
        return 1
    theirs, their_length = time_trl(trl_model, tokenizer, problems, args)
    print(f"TRL {trl.__version__} GRPOTrainer: {theirs:.2f} s/step (mean completion {their_length:.0f} tokens)")
    print(f"ratio (ours / TRL): {ours / theirs:.2f}x")
    return 0
