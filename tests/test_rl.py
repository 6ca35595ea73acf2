"""Hierarchical RL (thor_min/rl.py): filters, step-level prefixes, the mixed batch and its loss masks.

    pytest tests/test_rl.py
"""

import pytest
import torch

from thor_min import tiny
from thor_min.rl import (Groups, ProblemStream, RLConfig, TrainSample, _file_group, attach_old_logprobs,
                         build_samples, keep_trajectory, step_prefix, train_on_samples)
from thor_min.scoring import pad_batch
from thor_min.tasks import train_split
from thor_min.trajectory import Cell, Rollout

CONFIG = RLConfig(min_response_tokens=3, boxed_tail_chars=40, group_size=4)


def rollout(text="so \\boxed{7}", tokens=6, failed=False, cells=()) -> Rollout:
    """A synthetic rollout: `tokens` completion ids, optional failed final cell."""
    made = Rollout(request=0, sample=0, prompt_ids=[1, 2, 3], completion_ids=list(range(10, 10 + tokens)),
                   loss_mask=[1] * tokens, logprobs=[0.0] * tokens, text=text, finish_reason="eos")
    made.cells = list(cells)
    if failed:
        made.cells.append(Cell(code="1/0", passed=False, executed=True, observation="ZeroDivisionError",
                               fence_token=tokens - 2, close_token=tokens, output_end=tokens))
    return made


# ----------------------------------------------------------------------------------------------- filters


def test_keep_filter_rejects_a_trajectory_with_a_failed_cell():
    assert not keep_trajectory(rollout(failed=True), CONFIG), "failed-cell trajectories never enter the loss"


def test_keep_filter_rejects_short_responses():
    assert not keep_trajectory(rollout(tokens=2), CONFIG), "responses under min_response_tokens are dropped"


def test_keep_filter_needs_a_boxed_answer_near_the_end():
    far = "\\boxed{7} " + "x" * 100
    assert not keep_trajectory(rollout(text=far), CONFIG), "a boxed answer far from the end is not kept"
    assert not keep_trajectory(rollout(text="no answer"), CONFIG), "no boxed answer is not kept"
    assert keep_trajectory(rollout(), CONFIG), "a clean trajectory with a final boxed answer is kept"


def test_group_with_fewer_than_half_survivors_is_dropped():
    groups = Groups()
    members = [rollout(failed=True), rollout(failed=True), rollout(failed=True), rollout()]
    _file_group(groups, members, [0.0, 0.0, 0.0, 1.0], CONFIG)
    assert not groups.kept and groups.dropped_few_survivors == 1, "1 of 4 survivors must drop the group"


def test_zero_variance_group_is_dropped():
    groups = Groups()
    _file_group(groups, [rollout() for _ in range(4)], [1.0] * 4, CONFIG)
    assert not groups.kept and groups.dropped_zero_variance == 1, "all-equal rewards carry no signal"


def test_kept_group_excludes_failed_trajectories_and_records_the_first_failure():
    groups = Groups()
    failed = rollout(failed=True)
    members = [rollout(), failed, rollout(), rollout()]
    _file_group(groups, members, [1.0, 0.0, 0.0, 0.0], CONFIG)
    kept_rollouts, rewards = groups.kept[0]
    assert failed not in kept_rollouts and len(kept_rollouts) == 3, "the failed trajectory must not be trained on"
    assert rewards == [1.0, 0.0, 0.0], "rewards follow the surviving trajectories"
    assert groups.failed == [failed], "the failed trajectory becomes a step-level candidate"


# ----------------------------------------------------------------------------------------------- step level


def test_step_prefix_cuts_suffix_tokens_before_the_failed_fence():
    made = rollout(tokens=20, failed=True)            # failed fence at completion token 18
    prefix = step_prefix(made, suffix_tokens=5)
    assert prefix == made.prompt_ids + made.completion_ids[:13], "prefix = prompt + completion[:fence - L_suf]"


def test_step_prefix_never_cuts_into_an_earlier_observation():
    earlier = Cell(code="print(1)", passed=True, executed=True, observation="1", fence_token=2, close_token=6,
                   output_end=15)
    made = rollout(tokens=20, failed=True, cells=[earlier])
    prefix = step_prefix(made, suffix_tokens=10)
    assert len(prefix) == len(made.prompt_ids) + 15, "the cut stops at the end of the previous output block"


def test_step_samples_train_only_on_the_regenerated_tokens():
    continuation = Rollout(request=0, sample=0, prompt_ids=[1, 2, 3, 40, 41], completion_ids=[50, 51, 52],
                           loss_mask=[1, 1, 1], text="```python\nprint(1)\n```", finish_reason="cell")
    other = Rollout(request=0, sample=1, prompt_ids=[1, 2, 3, 40, 41], completion_ids=[60, 61],
                    loss_mask=[1, 1], text="```python\n1/0\n```", finish_reason="cell")
    samples = build_samples([], [([continuation, other], [1.0, 0.0])])
    assert [s.kind for s in samples] == ["step", "step"], "both continuations become step samples"
    assert samples[0].target_mask == [0, 0, 0, 0, 0, 1, 1, 1], "the prefix (prompt + kept reasoning) is never trained"
    assert samples[0].advantage > 0 > samples[1].advantage, "a passing block gets a positive advantage"


def test_trajectory_samples_never_train_on_observation_tokens():
    made = rollout(tokens=6)
    made.loss_mask = [1, 1, 0, 0, 1, 1]               # tokens 2-3 are a forced output block
    samples = build_samples([([made, rollout()], [1.0, 0.0])], [])
    assert samples[0].target_mask == [0, 0, 0, 1, 1, 0, 0, 1, 1], "observation tokens keep mask 0"


# ----------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = tiny.build_tokenizer()
    size = tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2)
    return tiny.build_model(tokenizer, size, seed=0).eval(), tokenizer


def test_scored_positions_are_exactly_the_masked_completion_tokens(tiny_model):
    model, tokenizer = tiny_model
    sample = TrainSample(context_ids=[5, 6, 7], completion_ids=[8, 9, 10, 11], loss_mask=[1, 0, 1, 1],
                         advantage=1.0, kind="trajectory")
    batch = pad_batch([sample.context_ids + sample.completion_ids], [sample.target_mask], tokenizer.pad_token_id)
    scored = batch.input_ids[batch.target_mask].tolist()
    assert scored == [8, 10, 11], "the loss sees exactly the sampled completion tokens, nothing else"


def test_old_and_new_logprobs_agree_before_the_first_update(tiny_model):
    model, tokenizer = tiny_model
    samples = [TrainSample([5, 6], [7, 8, 9], [1, 1, 1], 1.0, "trajectory"),
               TrainSample([5, 6], [10, 11], [1, 0], -1.0, "step")]
    attach_old_logprobs(model, samples, RLConfig(), tokenizer.pad_token_id)
    assert [len(s.old_logprobs) for s in samples] == [3, 1], "one old log-prob per trained token"


@pytest.mark.parametrize("minibatches", [1, 2, 3])
def test_every_minibatch_starts_on_policy_when_the_weights_do_not_move(tiny_model, minibatches):
    model, tokenizer = tiny_model
    samples = [TrainSample([5, 6], [7 + k, 8, 9 + k][:2 + k % 2], [1] * (2 + k % 2), (-1.0) ** k, "trajectory")
               for k in range(6)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = train_on_samples(model, optimizer, samples, RLConfig(minibatches=minibatches), tokenizer.pad_token_id,
                               seed=0)
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-5, "same code path: the on-policy ratio must be exactly 1"
    assert metrics["approx_kl_old"] < 1e-6, "no divergence from the old policy before any update"
    assert metrics["entropy"] > 0, "the entropy metric covers the trained tokens"


def test_problem_stream_cycles_deterministically():
    problems = train_split(5)
    first = [p.id for p in ProblemStream(problems, seed=3).take(7)]
    resumed = ProblemStream(problems, seed=3, position=4)
    assert [p.id for p in resumed.take(3)] == first[4:7], "a resumed stream continues where it stopped"
    assert first[:2] == first[5:7], "the stream wraps around the problem list"
