"""train.py end to end: flags, errors, and a run killed with SIGKILL that resumes from its checkpoint.

    pytest tests/test_pipeline.py          # the kill/resume test is marked slow (about a minute)
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thor_min.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train as train_cli  # noqa: E402  (the top-level script, imported for its parser)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(*args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          **kwargs)


def test_help_lists_every_stage():
    result = train("--help")
    assert result.returncode == 0, f"--help failed: {result.stderr}"
    for stage in ("pretrain", "tirgen", "sft", "rl", "eval"):
        assert stage in result.stdout, f"--help must mention the {stage} stage"


def test_an_unknown_flag_is_a_usage_error():
    result = train("--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr, "argparse must reject it"


def in_process(capfd, *args) -> tuple[int, str]:
    """train.py's main in this process (no interpreter start-up): its exit code and what it wrote to stderr."""
    try:
        code = train_cli.main(list(args))
    except SystemExit as exit_:      # what the interpreter does with SystemExit("error: ...")
        code = exit_.code if isinstance(exit_.code, int) else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    return code, capfd.readouterr().err


def test_a_full_run_into_a_used_directory_needs_resume_or_overwrite(tmp_path, capfd):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    code, stderr = in_process(capfd, "--out", str(tmp_path))
    assert code != 0, "starting over a previous run must not proceed silently"
    assert "--resume" in stderr and "--overwrite" in stderr, f"the error names the fix: {stderr}"
    assert (tmp_path / "metrics.jsonl").exists(), "nothing of the previous run is lost"


def test_sft_without_tirgen_data_is_one_clear_line(tmp_path, capfd):
    code, stderr = in_process(capfd, "--stage", "sft", "--out", str(tmp_path))
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "tirgen" in lines[0], f"one line naming the fix: {lines}"


def test_an_unloadable_model_is_one_clear_line(tmp_path, capfd):
    code, stderr = in_process(capfd, "--model", str(tmp_path / "missing"), "--stage", "eval", "--out",
                              str(tmp_path / "out"))
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"got: {lines}"


def test_flags_override_the_preset():
    run = train_cli.build_run(train_cli.parse_args(["--model", "qwen-1.5b", "--rollout-batch", "16",
                                                    "--max-new-tokens", "1024", "--group-size", "4", "--threads", "3"]))
    preset = run.preset
    assert (preset.rollout_batch, preset.rl_max_new_tokens, preset.eval_max_new_tokens) == (16, 1024, 1024), \
        "--rollout-batch / --max-new-tokens must size both RL and evaluation rollouts"
    assert preset.rl_group == 4, "--group-size must reach the preset"
    assert preset.cpu_threads == 3, "--threads must reach the preset"


def test_unset_flags_keep_the_preset_defaults():
    run = train_cli.build_run(train_cli.parse_args(["--model", "qwen-7b"]))
    assert run.preset == PRESETS["qwen-7b"], "flags that were not given must not change the preset"
    assert run.out == Path("runs/qwen-7b"), "the default output directory is runs/<model>"


@pytest.mark.parametrize("flag, variants", [("--no-tools", ("rl-cot",)), ("--no-step-level", ("rl-traj",))])
def test_ablation_flags_pick_the_rl_variant(flag, variants):
    run = train_cli.build_run(train_cli.parse_args(["--model", "tiny", flag]))
    assert run.preset.rl_variants == variants, f"{flag} must select {variants}"


def test_a_stage_without_its_input_names_the_stage_to_run(tmp_path, capfd):
    code, stderr = in_process(capfd, "--stage", "tirgen", "--out", str(tmp_path))
    assert code != 0 and "run --stage pretrain first" in stderr, f"got: {stderr}"
    assert "Traceback" not in stderr and "failed" not in stderr, f"one clear line, from this process: {stderr}"


def _checkpoint_step(out: Path) -> int:
    pointer = out / "checkpoints" / "pretrain" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.exists() else 0


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_loses_at_most_the_step_in_flight(tmp_path):
    args = ["--stage", "pretrain", "--out", str(tmp_path), "--pretrain-steps", "24", "--pretrain-batch", "1",
            "--checkpoint-every", "1"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while _checkpoint_step(tmp_path) < 6 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = time.time()
    saved = _checkpoint_step(tmp_path)
    assert 6 <= saved < 24, f"the run should have been killed mid-way, checkpoint at step {saved}"
    assert not (tmp_path / "base" / "config.json").exists(), "a killed stage must not leave a finished model"
    logged_before = max(json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())

    result = train(*args, "--resume", timeout=600)
    assert result.returncode == 0, f"resume failed: {result.stderr[-2000:]}"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [row["step"] for row in rows if row["time"] > killed_at]
    assert min(resumed) >= logged_before, f"resumed at step {min(resumed)}, more than the step in flight was lost"
    assert min(resumed) == saved + 1, "training continues right after the last checkpoint"
    assert max(resumed) == 24 and (tmp_path / "base" / "config.json").exists(), "the resumed stage finishes"


def test_plain_cot_sft_uses_the_references_of_the_tirgen_problems(tmp_path, tokenizer):
    from thor_min.pipeline import sft_examples
    from thor_min.run_context import Run, training_problems

    run = Run(preset=PRESETS["tiny"], out=tmp_path)
    problems = training_problems(run, 5, salt=0)
    records = [{"id": p.id, "problem": p.question, "response": "```python\nprint(1)\n```\n"} for p in problems[2:5]]
    examples = sft_examples(run, tokenizer, records, tools=False)
    texts = [tokenizer.decode(e.ids, skip_special_tokens=True) for e in examples]
    for problem, text in zip(problems[2:5], texts):
        assert text.endswith(problem.reference), f"plain SFT must train on the problem's reference: {text!r}"
        assert "```python" not in text, "plain SFT must not see the tool samples"


def test_the_shipped_base_was_pretrained_with_the_tiny_presets_settings():
    from thor_min.tiny import uses_shipped_base

    assert uses_shipped_base(PRESETS["tiny"], PRESETS["tiny"].pretrain_seed), \
        "thor_min/assets/tiny-base must be rebuilt (--tiny-base train, then copy OUT/base) when the preset changes"


def test_the_shipped_tokenizer_is_the_one_the_tiny_world_builds():
    from thor_min import tiny
    from thor_min.models import load_tokenizer
    from thor_min.tiny import SHIPPED_BASE

    assert load_tokenizer(str(SHIPPED_BASE)).get_vocab() == tiny.build_tokenizer().get_vocab(), \
        "the tiny world's corpus changed since the base was pretrained: rebuild thor_min/assets/tiny-base"


def test_a_tiny_run_starts_from_the_shipped_base(tmp_path):
    from thor_min.pipeline import stage_pretrain
    from thor_min.run_context import Run
    from thor_min.tiny import SHIPPED_BASE

    run = Run(preset=PRESETS["tiny"], out=tmp_path)
    stage_pretrain(run)
    copied = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert copied == (SHIPPED_BASE / "model.safetensors").read_bytes(), "the run's base must be the shipped bytes"
    recorded = json.loads((tmp_path / "stages.json").read_text())["pretrain"]
    assert recorded["shipped"] and recorded["steps"] == 2400, f"stages.json must say where the base came from: {recorded}"


@pytest.mark.parametrize("change", [{"pretrain_steps": 5}, {"pretrain_seed": 0}, {"micro_batch_tokens": 4096},
                                    {"tiny_base": "train"}])
def test_other_pretraining_settings_do_not_use_the_shipped_base(change):
    from dataclasses import replace

    from thor_min.tiny import uses_shipped_base

    preset = replace(PRESETS["tiny"], **change)
    assert not uses_shipped_base(preset, preset.pretrain_seed), f"{change}: then the run must pretrain its own base"
