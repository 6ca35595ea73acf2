"""The bench CLIs: argument handling and our RL step's code path (timings are never asserted)."""

import sys

import pytest

from thor_min.bench import __main__ as bench_cli
from thor_min.bench import rl_step
from thor_min.bench import rollout as rollout_bench

SMALL = ["--prompts", "2", "--group", "2", "--new-tokens", "6", "--minibatches", "2", "--repeats", "1",
         "--fit-steps", "0"]


def test_an_unknown_bench_is_a_usage_error_that_lists_rl_step(capsys):
    assert bench_cli.main(["nosuch"]) == 2, "an unknown bench must exit 2"
    assert "rl-step" in capsys.readouterr().err, "the usage line lists every bench"


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "3", "--group", "3", "--minibatches", "2"], "equal minibatches"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_rl_step_rejects_bad_arguments_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        rl_step.parse_args(argv)
    assert message in capsys.readouterr().err, f"the error must say {message!r}"


def test_rl_step_times_our_step_and_names_the_install_when_trl_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)          # `import trl` now raises ImportError
    assert bench_cli.main(["rl-step", *SMALL]) == 1, "a missing TRL is exit status 1"
    out = capsys.readouterr().out
    assert "ours:" in out and "s/step" in out, f"our step must be timed before TRL is needed: {out}"
    assert rl_step.INSTALL_HINT in out, "the bench says in one line how to install TRL"


def test_our_bench_step_samples_every_row_and_takes_one_update_per_minibatch():
    args = rl_step.parse_args(SMALL)
    problems = rl_step.tasks.train_split(args.prompts)
    model, tokenizer = rl_step.bench_model(problems, fit_steps=0, seed=0)
    config = rl_step.rl_config(args)
    optimizer = rl_step.build_optimizer(model.parameters(), 1e-2, weight_decay=0.0)
    lengths = rl_step.our_step(model, tokenizer, rl_step.RolloutEngine(model, tokenizer), optimizer, problems, config,
                               seed=0)
    assert len(lengths) == 4 and all(1 <= n <= 6 for n in lengths), f"P*G completions of <= N tokens: {lengths}"
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {2}, f"--minibatches 2 means two optimiser steps over every parameter, got {steps}"


def test_rollout_bench_reports_the_median_of_interleaved_pair_ratios():
    calls = []
    ours_s, theirs_s = rollout_bench.timed_pairs(lambda: calls.append("ours"), lambda: calls.append("theirs"), 3)
    assert calls == ["ours", "theirs"] * 4, f"one warm-up call each, then pairs, ours first: {calls}"
    timing = rollout_bench.Timing(ours_s=[1.0, 2.0, 1.0], theirs_s=[2.0, 2.0, 3.0], ours_tokens=10, theirs_tokens=10)
    assert timing.ratios == [1.0, 2.0, 3.0], f"per-pair ratios of tokens/s, sorted: {timing.ratios}"
    assert "2.00x (median of 3 interleaved pairs, range 1.00-3.00x)" in timing.ratio_line("r"), timing.ratio_line("r")


def test_rollout_bench_rejects_zero_repeats(capsys):
    with pytest.raises(SystemExit):
        rollout_bench.parse_args(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err, "the error must name the flag"
