"""Hierarchical RL (THOR section 4): GRPO on whole trajectories plus a step-level loss on failed code steps.

One RL step:
1. **Trajectory rollouts**: G samples per prompt (T = 1, no top-p), each row stops at its first failed cell.
   Reward = `grade()` of the final answer. Keep-filters: long enough, a `\\boxed{}` near the end, no failed
   cell (a failure may be the sandbox's fault, so those trajectories are not punished here); a group with
   fewer than half survivors is dropped, and so is a group whose rewards are all equal (DAPO dynamic
   sampling: more prompts are drawn until the batch is full, for at most `max_sampling_rounds` rounds).
2. **Step-level samples**: for at most one failed trajectory per prompt, the prefix before the failed
   ```python fence minus `step_suffix_tokens` tokens (never cutting into an earlier observation) is
   continued G times; each continuation stops right after its first code block closes; reward = that
   block passes. Only the regenerated tokens are trained; no observation is appended.
3. **One mixed batch, one loss** (`thor_min.losses.policy_loss`: token-mean, clip-higher, dual clip, NLL on
   positive-advantage samples, no KL by default). "Off-policy GRPO": the batch is split into `minibatches`
   sequential optimiser steps against fixed old log-probs, computed through the same scoring code path as
   the new ones (the first minibatch's in its own forward, the others' in one pass before any update).
`tools=False` gives plain chain-of-thought GRPO (the paper's "RL without tools" ablation) and
`step_level=False` the trajectory-only ablation.
Limits: one model process (rollouts and training share the GPU); the prompt stream cycles through the
given problems in a fixed shuffled order.
"""

import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from thor_min import distributed
from thor_min.checkpoint import load_latest, save_checkpoint
from thor_min.data import Problem
from thor_min.grader import extract_boxed, grade_batch
from thor_min.losses import group_advantages, policy_loss
from thor_min.optim import build_optimizer, guarded_step
from thor_min.rollout import RolloutRequest, SamplingConfig
from thor_min.scoring import micro_batches, pad_batch, scatter_targets, sequence_logprobs
from thor_min.trajectory import Rollout


@dataclass
class RLConfig:
    prompts_per_step: int = 32
    group_size: int = 16             # G
    max_new_tokens: int = 3200
    max_tool_calls: int = 5
    temperature: float = 1.0
    tools: bool = True               # False: plain CoT RL (no execution, no step level)
    step_level: bool = True
    step_suffix_tokens: int = 100    # L_suf (training)
    step_max_new_tokens: int = 512   # budget for a regenerated suffix + code block
    min_response_tokens: int = 150   # keep-filter (THOR code)
    boxed_tail_chars: int = 300      # the boxed answer must start within the last N characters
    max_sampling_rounds: int = 3
    minibatches: int = 4             # optimiser steps per rollout batch
    micro_batch_tokens: int = 16384
    lr: float = 1e-6
    max_grad_norm: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 3.0
    nll_alpha: float = 0.01
    aggregation: str = "token-mean"
    kl_beta: float = 0.0
    batch_size: int = 256            # engine rows per forward
    seed: int = 0


@dataclass
class TrainSample:
    """One sequence of the mixed batch: context ids (not trained) + generated ids (masked) + advantage."""

    context_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]
    advantage: float
    kind: str                         # "trajectory" or "step"
    old_logprobs: list[float] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.completion_ids

    @property
    def target_mask(self) -> list[int]:
        return [0] * len(self.context_ids) + list(self.loss_mask)


class ProblemStream:
    """Cycles through training problems in a seeded shuffled order; `position` is checkpointed."""

    def __init__(self, problems: list[Problem], seed: int, position: int = 0):
        if not problems:
            raise ValueError("the RL prompt set is empty")
        self.problems = list(problems)
        random.Random(seed).shuffle(self.problems)
        self.position = position

    def take(self, n: int) -> list[Problem]:
        batch = [self.problems[(self.position + i) % len(self.problems)] for i in range(n)]
        self.position += n
        return batch


# ----------------------------------------------------------------------------------------------
# Rollouts and filters


def keep_trajectory(rollout: Rollout, config: RLConfig) -> bool:
    """THOR's keep-filters: no failed cell, long enough, a non-empty boxed answer near the end."""
    if rollout.failed_cell is not None or len(rollout.completion_ids) < config.min_response_tokens:
        return False
    tail = rollout.text[-config.boxed_tail_chars:]
    answer = extract_boxed(tail)
    return answer is not None and answer.strip() != ""


def trajectory_config(config: RLConfig) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                          max_tool_calls=config.max_tool_calls if config.tools else 0,
                          stop_at_first_failure=True, batch_size=config.batch_size)


@dataclass
class Groups:
    """What one round of sampling produced: kept trajectory groups, step-level candidates, and counts."""

    kept: list[tuple[list[Rollout], list[float]]] = field(default_factory=list)
    failed: list[Rollout] = field(default_factory=list)        # first failed trajectory per prompt
    sampled: list[Rollout] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    dropped_few_survivors: int = 0
    dropped_zero_variance: int = 0


def sample_trajectory_groups(engine, stream: ProblemStream, prompt_ids, config: RLConfig, seed: int) -> Groups:
    """Draw prompt groups until `prompts_per_step` groups survive the filters (bounded rounds)."""
    groups = Groups()
    for round_index in range(config.max_sampling_rounds):
        missing = config.prompts_per_step - len(groups.kept)
        if missing <= 0:
            break
        problems = stream.take(missing if round_index == 0 else max(missing, config.prompts_per_step // 2))
        requests = [RolloutRequest(prompt_ids(p), config.group_size) for p in problems]
        rollouts = engine.generate(requests, trajectory_config(config), seed=seed * 100 + round_index)
        rewards = [float(ok) for ok in grade_batch([r.text for r in rollouts],
                                                   [problems[r.request].golds for r in rollouts])]
        groups.sampled += rollouts
        groups.rewards += rewards
        for start in range(0, len(rollouts), config.group_size):
            _file_group(groups, rollouts[start:start + config.group_size],
                        rewards[start:start + config.group_size], config)
    groups.kept = groups.kept[:config.prompts_per_step]
    return groups


def _file_group(groups: Groups, group: list[Rollout], rewards: list[float], config: RLConfig) -> None:
    failed = [r for r in group if r.failed_cell is not None]
    if failed:
        groups.failed.append(failed[0])
    survivors = [(r, reward) for r, reward in zip(group, rewards) if keep_trajectory(r, config)]
    if 2 * len(survivors) < len(group):
        groups.dropped_few_survivors += 1
    elif len({reward for _, reward in survivors}) < 2:
        groups.dropped_zero_variance += 1
    else:
        groups.kept.append(([r for r, _ in survivors], [reward for _, reward in survivors]))


def step_prefix(rollout: Rollout, suffix_tokens: int) -> list[int]:
    """Prompt + completion before the failed fence, minus `suffix_tokens`, never inside an earlier output."""
    cell = rollout.failed_cell
    floor = max((c.output_end for c in rollout.cells if c.output_end <= cell.fence_token), default=0)
    cut = max(floor, cell.fence_token - suffix_tokens)
    return rollout.prompt_ids + rollout.completion_ids[:cut]


def sample_step_groups(engine, failed: list[Rollout], config: RLConfig, seed: int):
    """G continuations of each failed trajectory's prefix, stopping after their first code block."""
    prefixes = [step_prefix(r, config.step_suffix_tokens) for r in failed[:config.prompts_per_step]]
    if not prefixes:
        return [], []
    sampling = SamplingConfig(max_new_tokens=config.step_max_new_tokens, temperature=config.temperature,
                              max_tool_calls=1, stop_after_first_cell=True, batch_size=config.batch_size)
    rollouts = engine.generate([RolloutRequest(p, config.group_size) for p in prefixes], sampling, seed=seed)
    kept, pass_rewards = [], []
    for start in range(0, len(rollouts), config.group_size):
        group = rollouts[start:start + config.group_size]
        rewards = [float(bool(r.cells) and r.cells[0].passed) for r in group]
        pass_rewards += rewards
        closed = [(r, reward) for r, reward in zip(group, rewards) if r.finish_reason == "cell"]
        if 2 * len(closed) >= len(group) and len({reward for _, reward in closed}) == 2:
            kept.append(([r for r, _ in closed], [reward for _, reward in closed]))
    return kept, pass_rewards


def build_samples(trajectory_groups, step_groups) -> list[TrainSample]:
    """Group-normalised advantages; trajectory samples train on sampled tokens, step samples on the suffix."""
    samples = []
    for kind, groups in (("trajectory", trajectory_groups), ("step", step_groups)):
        for rollouts, rewards in groups:
            advantages = group_advantages(torch.tensor(rewards), len(rewards)).tolist()
            for rollout, advantage in zip(rollouts, advantages):
                samples.append(TrainSample(rollout.prompt_ids, rollout.completion_ids, rollout.loss_mask,
                                           advantage, kind))
    return samples


# ----------------------------------------------------------------------------------------------
# Scoring and updates


def _score(model, samples: list[TrainSample], indices: list[int], pad_id: int, entropy: bool = False):
    batch = pad_batch([samples[i].ids for i in indices],
                      [samples[i].target_mask for i in indices], pad_id).to(model.device)
    return batch, sequence_logprobs(model, batch, return_entropy=entropy)


@torch.no_grad()
def attach_old_logprobs(model, samples: list[TrainSample], config: RLConfig, pad_id: int,
                        indices: list[int] | None = None) -> tuple[float, int]:
    """Score `indices` (default: every sample) before any update (the fixed "old" policy).

    Returns (summed entropy, scored tokens) for the entropy metric."""
    model.eval()
    lengths = [len(s.ids) for s in samples]
    entropy_sum, tokens, scored = 0.0, 0, []
    indices = list(range(len(samples))) if indices is None else indices
    groups = micro_batches(lengths, distributed.shard(indices), config.micro_batch_tokens)
    for group, real in distributed.lockstep(model, groups, spare=indices[:1]):
        _, (logp, entropy) = _score(model, samples, group, pad_id, entropy=True)
        if not real:
            continue
        offset = 0
        for i in group:
            count = sum(samples[i].loss_mask)
            scored.append((i, logp[offset:offset + count].tolist()))
            offset += count
        entropy_sum, tokens = entropy_sum + float(entropy.sum()), tokens + len(entropy)
    for i, old_logprobs in distributed.gather(scored):   # every rank scored its share; all ranks get all
        samples[i].old_logprobs = old_logprobs
    return entropy_sum, tokens                           # this rank's sums (train_on_samples adds the ranks')


def train_on_samples(model, optimizer, samples: list[TrainSample], config: RLConfig, pad_id: int, seed: int) -> dict:
    """`config.minibatches` sequential optimiser steps over a shuffled split of `samples`.

    The first minibatch is on-policy: its old log-probs are its own detached new ones, from the same forward.
    Only the later minibatches are scored beforehand (`attach_old_logprobs`), which saves that share of a forward
    pass over the batch per RL step.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    parts = [order[i::config.minibatches] for i in range(config.minibatches) if order[i::config.minibatches]]
    entropy_sum, entropy_tokens = attach_old_logprobs(model, samples, config, pad_id, [i for p in parts[1:] for i in p])
    model.train()
    lengths = [len(s.ids) for s in samples]
    totals: dict[str, float] = {}
    skipped = 0
    for index, part in enumerate(parts):
        num_tokens = sum(sum(samples[i].loss_mask) for i in part)
        loss_value = 0.0
        groups = micro_batches(lengths, distributed.shard(part), config.micro_batch_tokens)
        for group, real in distributed.lockstep(model, groups, spare=part[:1]):
            if not real:         # FSDP2: a zero-weight pass, so that this rank joins the others' collectives
                (_score(model, samples, group, pad_id)[1].sum() * 0.0).backward()
                continue
            if index == 0:
                batch, (logp, entropy) = _score(model, samples, group, pad_id, entropy=True)
                old = logp.detach()
                entropy_sum, entropy_tokens = entropy_sum + float(entropy.sum()), entropy_tokens + len(entropy)
            else:
                batch, logp = _score(model, samples, group, pad_id)
                old = torch.tensor([v for i in group for v in samples[i].old_logprobs], device=logp.device)
            advantages = torch.tensor([samples[i].advantage for i in group], device=logp.device)
            loss, metrics = policy_loss(
                scatter_targets(logp, batch), scatter_targets(old, batch), advantages, batch.target_mask,
                eps_low=config.eps_low, eps_high=config.eps_high, dual_clip=config.dual_clip,
                aggregation=config.aggregation, nll_alpha=config.nll_alpha, num_tokens=num_tokens,
                num_seqs=len(part))
            loss.backward()
            loss_value += float(loss.detach())
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * metrics.get("num_tokens", 1.0)
        # each rank scored its share of `part` over the part's global token count: sums = the 1-process step
        distributed.sum_gradients(model)
        stepped, _ = guarded_step(optimizer, distributed.all_sum([loss_value])[0], config.max_grad_norm)
        skipped += not stepped
    model.eval()
    totals = _summed(distributed.gather([totals]))
    weight = sum(sum(s.loss_mask) for s in samples) or 1
    summary = {key: value / weight for key, value in totals.items() if key != "num_tokens"}
    summary["skipped_updates"] = skipped
    entropy_sum, entropy_tokens = distributed.all_sum([entropy_sum, entropy_tokens])
    summary["entropy"] = entropy_sum / max(entropy_tokens, 1)
    return summary


def _summed(parts: list[dict]) -> dict:
    """Key-wise sum of the ranks' metric totals (one dict per rank; a rank may have none of some keys)."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


# ----------------------------------------------------------------------------------------------
# One step, and the loop


def rl_step(model, engine, optimizer, stream: ProblemStream, prompt_ids, config: RLConfig, step: int, pad_id: int) -> dict:
    """Sample, filter, build the mixed batch, update. Returns the step's metrics."""
    timings, started = {}, time.time()
    groups = sample_trajectory_groups(engine, stream, prompt_ids, config, seed=config.seed * 100_003 + step)
    timings["seconds_rollout"] = time.time() - started
    step_groups, step_rewards = [], []
    if config.tools and config.step_level:
        started = time.time()
        step_groups, step_rewards = sample_step_groups(engine, groups.failed, config, seed=config.seed * 7 + step)
        timings["seconds_step_rollout"] = time.time() - started
    samples = build_samples(groups.kept, step_groups)
    metrics = rollout_metrics(groups, step_rewards)
    metrics.update(timings)
    metrics["tokens_per_s"] = metrics["sampled_tokens"] / max(timings["seconds_rollout"], 1e-9)
    metrics.update(trajectory_samples=sum(s.kind == "trajectory" for s in samples),
                   step_samples=sum(s.kind == "step" for s in samples))
    if samples:
        started = time.time()
        metrics.update(train_on_samples(model, optimizer, samples, config, pad_id, seed=config.seed + step))
        metrics["seconds_train"] = time.time() - started
    return metrics


def rollout_metrics(groups: Groups, step_rewards: list[float]) -> dict:
    """Reward (= accuracy: 1 for a correct answer, else 0) and tool-use rates over every sampled trajectory."""
    rollouts = groups.sampled
    executed = [c for r in rollouts for c in r.executed_cells]
    return {
        "reward": sum(groups.rewards) / max(len(groups.rewards), 1),
        "cell_call_rate": sum(bool(r.executed_cells) for r in rollouts) / max(len(rollouts), 1),
        "cell_pass_rate": sum(c.passed for c in executed) / max(len(executed), 1),
        "step_pass_rate": sum(step_rewards) / len(step_rewards) if step_rewards else float("nan"),
        "groups_kept": len(groups.kept),
        "groups_dropped_zero_variance": groups.dropped_zero_variance,
        "groups_dropped_few_survivors": groups.dropped_few_survivors,
        "sampled_tokens": sum(r.sampled_tokens for r in rollouts),
        "response_tokens": sum(len(r.completion_ids) for r in rollouts) / max(len(rollouts), 1),
    }


def run_rl(model, tokenizer, engine, problems: list[Problem], prompt_ids, config: RLConfig, steps: int, *, log,
           stage: str = "rl", checkpoint_dir=None, resume: bool = False, eval_every: int = 0, evaluate=None,
           checkpoint_every: int = 10) -> dict:
    """`steps` RL steps on `problems`; metrics per step to `log`; resumable from `checkpoint_dir`.

    `evaluate()` (optional) returns a dict of held-out metrics, logged every `eval_every` steps and at the end.
    """
    optimizer = build_optimizer(model.parameters(), config.lr, weight_decay=0.0, betas=(0.9, 0.999))
    start, position, skipped = 0, 0, 0
    if resume and checkpoint_dir is not None:
        found = load_latest(checkpoint_dir, model=model, optimizer=optimizer)
        if found is not None:
            start, position, skipped = found.step, found.state["position"], found.state.get("skipped", 0)
    stream = ProblemStream(problems, config.seed, position)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if start == 0:
        log.drop_stage(stage)
        if evaluate is not None:
            log.log(stage, 0, **{f"eval_{k}": v for k, v in evaluate().items()})
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True)
    last = {}
    for step in bar:
        metrics = rl_step(model, engine, optimizer, stream, prompt_ids, config, step, pad_id)
        skipped += metrics.get("skipped_updates", 0)
        metrics["skipped_updates"] = skipped
        if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            metrics.update({f"eval_{k}": v for k, v in evaluate().items()})
        log.log(stage, step + 1, **metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", cells=f"{metrics['cell_pass_rate']:.2f}")
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, step=step + 1,
                            state={"position": stream.position, "skipped": skipped})
        last = metrics
    log.plot()
    return last
