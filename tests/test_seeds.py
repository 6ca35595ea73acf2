"""`train.py --seeds`: one run per seed in OUT/seed-N, then one table across seeds (OUT/seeds.md, seeds.json)."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train as train_cli  # noqa: E402  (the top-level script)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def row(name, accuracy, *, heldout=0.1, pass_rate=0.9, kinds=None):
    return {"name": name, "model": name, "accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05],
            "heldout_accuracy": heldout, "cell_call_rate": 0.8, "cell_pass_rate": pass_rate, "tokens": 50.0,
            "kinds": kinds or {}}


def write_summary(out: Path, seed: int, rows: list[dict], seconds: float = 600.0) -> Path:
    path = out / f"seed-{seed}" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rows": rows, "seconds": seconds, "cores": 2, "machine": "Test CPU, 2 cores",
                                "samples": 4, "temperature": 0.6, "model": "tiny"}))
    return path


def test_seeds_flag_parses_a_list():
    args = train_cli.parse_args(["--seeds", "0", "1", "2", "--jobs", "3"])
    assert args.seeds == [0, 1, 2] and args.jobs == 3, f"got seeds={args.seeds}, jobs={args.jobs}"


def test_seed_argv_drops_the_study_flags_and_adds_the_seeds_own():
    argv = ["--seeds", "0", "1", "--rl-steps", "2", "--out", "runs/x", "--jobs", "2", "--seed=5", "--resume"]
    got = train_cli.seed_argv(argv, 1, Path("runs/x/seed-1"))
    assert got == ["--rl-steps", "2", "--resume", "--seed", "1", "--out", "runs/x/seed-1"], got


def test_seed_argv_keeps_flags_given_after_the_seed_list():
    got = train_cli.seed_argv(["--seeds", "3", "4", "--ablation"], 4, Path("o/seed-4"))
    assert got == ["--ablation", "--seed", "4", "--out", "o/seed-4"], got


def test_table_has_mean_and_range_per_row(tmp_path):
    from thor_min.report import write_seeds_table

    paths = {seed: write_summary(tmp_path, seed, [row("base-cot", 0.01 * seed), row("step-rl", accuracy,
                                                                                  kinds={"linear": accuracy})])
             for seed, accuracy in ((0, 0.60), (1, 0.70), (2, 0.80))}
    study = write_seeds_table(tmp_path, paths)
    step = next(r for r in study["rows"] if r["name"] == "step-rl")
    assert step["accuracy"] == pytest.approx({"mean": 0.70, "min": 0.60, "max": 0.80}), step["accuracy"]
    assert step["kinds"]["linear"]["min"] == pytest.approx(0.60), step["kinds"]
    assert json.loads((tmp_path / "seeds.json").read_text()) == study, "seeds.json holds the study"
    text = (tmp_path / "seeds.md").read_text()
    assert "| step-rl |" in text and "70.0 (60.0-80.0)" in text, text
    assert "60.0 / 70.0 / 80.0" in text, "each seed's accuracy is listed"
    assert "Test CPU, 2 cores" in text and "seed 0: 10.0" in text, "the table names the machine and minutes"
    assert text.index("| base-cot |") < text.index("| step-rl |"), "rows in claim order"


def test_finished_seeds_are_not_run_again_with_resume(tmp_path):
    for seed in (0, 1):
        write_summary(tmp_path, seed, [row("step-rl", 0.5 + 0.1 * seed)])
    assert train_cli.main(["--seeds", "0", "1", "--resume", "--out", str(tmp_path)]) == 0
    study = json.loads((tmp_path / "seeds.json").read_text())
    assert study["seeds"] == [0, 1] and study["rows"][0]["accuracy"]["mean"] == pytest.approx(0.55), study
    assert not (tmp_path / "seed-0.log").exists(), "no seed was run again"


def test_a_failed_seed_fails_the_study_and_writes_no_table(tmp_path, capfd):
    # the study runs in this process (its seeds are train.py processes, as always)
    assert train_cli.main(["--seeds", "0", "--stage", "sft", "--out", str(tmp_path)]) == 1, "a failed seed fails"
    assert "seeds 0 failed" in capfd.readouterr().err, "the error names the failed seed"
    assert not (tmp_path / "seeds.md").exists(), "no table from a failed seed"


@pytest.mark.slow
def test_seeds_share_the_base_of_the_fixed_pretraining_seed(tmp_path, capfd, monkeypatch):
    # tiny budgets: the 3-step base yields no TIRGen data, so both seeds stop at SFT; the base is what is checked.
    # The study runs in this process; its pretraining and its seeds are train.py processes, as always.
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    code = train_cli.main(["--seeds", "3", "4", "--jobs", "2", "--pretrain-steps", "3", "--tirgen-problems", "2",
                           "--tirgen-attempts", "1", "--out", str(tmp_path)])
    errors = capfd.readouterr().err
    assert code == 1 and "seeds 3, 4 failed" in errors, errors[-2000:]
    weights = [(tmp_path / f"seed-{s}" / "base" / "model.safetensors").read_bytes() for s in (3, 4)]
    assert weights[0] == weights[1], "every seed starts from the one shared base"
    for seed in (3, 4):
        log = (tmp_path / f"seed-{seed}.log").read_text()
        assert "pretrain: done already" in log and "tirgen:" in log, f"seed {seed} must skip pretraining: {log[-800:]}"
    assert not (tmp_path / "seeds.md").exists(), "no table from failed seeds"


def test_with_the_shipped_base_every_seed_copies_it_itself(tmp_path):
    argv = ["--seeds", "0", "1"]
    assert train_cli.share_base(train_cli.parse_args(argv), argv, tmp_path, [0, 1]) is None, \
        "the default preset's base ships: nothing to pretrain once and share"
    assert not any(tmp_path.iterdir()), "and nothing is written before the seeds run"
