"""train.py's command line: flags reach the preset, bad input fails in one line, runs are never clobbered."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from thor_min.config import PRESETS  # noqa: E402


def test_flags_override_the_preset():
    run = train.build_run(train.parse_args(["--model", "qwen-1.5b", "--rollout-batch", "16", "--max-new-tokens",
                                            "1024", "--group-size", "4", "--lora-rank", "8"]))
    preset = run.preset
    assert (preset.rollout_batch, preset.rl_max_new_tokens, preset.eval_max_new_tokens) == (16, 1024, 1024), \
        "--rollout-batch / --max-new-tokens must size both RL and evaluation rollouts"
    assert (preset.rl_group, preset.lora_rank) == (4, 8), "--group-size / --lora-rank must reach the preset"


def test_unset_flags_keep_the_preset_defaults():
    run = train.build_run(train.parse_args(["--model", "qwen-7b"]))
    assert run.preset == PRESETS["qwen-7b"], "flags that were not given must not change the preset"
    assert run.out == Path("runs/qwen-7b"), "the default output directory is runs/<model>"


@pytest.mark.parametrize("flag, variants", [("--no-tools", ("rl-cot",)), ("--no-step-level", ("rl-traj",))])
def test_ablation_flags_pick_the_rl_variant(flag, variants):
    run = train.build_run(train.parse_args(["--model", "tiny", flag]))
    assert run.preset.rl_variants == variants, f"{flag} must select {variants}"


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--group-sise", "4"])
    assert exit_info.value.code == 2, "argparse usage errors exit with status 2"
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_used_out_dir_is_never_clobbered(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="--resume to continue it"):
        train.main(["--out", str(tmp_path)])
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n", "the old run must be left as it was"


def test_an_unreachable_model_fails_in_one_line(tmp_path, capsys):
    code = train.main(["--model", "qwen-1.5b", "--stage", "tirgen", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err, f"want one error line, got {err!r}"


def test_a_stage_without_its_input_names_the_stage_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run --stage pretrain first"):
        train.main(["--model", "tiny", "--stage", "tirgen", "--out", str(tmp_path / "run")])
