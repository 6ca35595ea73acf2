"""Data parallelism on CPU with gloo: 2 real ranks under torchrun make the same run as 1 process.

    pytest tests/test_distributed.py        # three torchrun launches of 2 ranks (minutes on a loaded 2-core machine)

The scenarios live in tests/distributed_worker.py; the 1-process reference runs in this process (world size 1
is the same code path), the 2-rank run under `torchrun --standalone --nproc_per_node 2`. Tolerances: 2 ranks
sum the gradient of each half-batch, so parameters agree to float32 summation order, not bit for bit
(measured max |diff| ~1e-7 after SFT, ~3e-6 after RL with lr 1e-3; asserted 1e-5). Full fine-tuning runs
sharded by FSDP2 on the 2 ranks, LoRA replicated; sampled tokens and
written files must be identical. Where a rank's batch holds other rows than one process's, a row's logits may
differ by float noise (measured on an Intel Ice Lake Xeon: MKL rounds a 1- or 2-row matmul otherwise), so the
evaluation scenario gives each rank exactly one of one process's batches.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
sys.path.insert(0, str(WORKER.parent))
import distributed_worker  # noqa: E402  (the scenarios, shared with the torchrun ranks)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
TOLERANCE = 1e-5
pytestmark = pytest.mark.slow


def torchrun(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    one, two = tmp_path_factory.mktemp("one-rank"), tmp_path_factory.mktemp("two-ranks")
    distributed_worker.parity(one)       # world size 1, in this process
    result = torchrun("parity", two)
    assert result.returncode == 0, f"the 2-rank run failed: {result.stderr[-3000:]}"
    return one, two


def max_difference(one: Path, two: Path, name: str) -> float:
    first, second = torch.load(one / name), torch.load(two / name)
    assert first.keys() == second.keys(), f"{name}: both runs must train the same parameters"
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def test_one_sft_step_on_two_ranks_equals_one_process(runs):
    difference = max_difference(*runs, "sft.pt")
    assert difference < TOLERANCE, f"LoRA parameters after one SFT step differ by {difference:.2e}"


def test_one_full_fine_tuning_sft_step_on_two_fsdp2_ranks_equals_one_process(runs):
    difference = max_difference(*runs, "sft-full.pt")
    assert difference < TOLERANCE, f"parameters after one FSDP2 SFT step differ by {difference:.2e}"


def test_full_fine_tuning_shards_the_parameters_over_the_ranks(runs):
    one, two = (json.loads((run / "sharding.json").read_text()) for run in runs)
    assert one["local"] == one["whole"], "one process holds every weight"
    assert two["local"] <= 0.55 * two["whole"], f"FSDP2 rank 0 must hold about half the weights: {two}"


def test_one_rl_step_with_step_level_samples_on_two_ranks_equals_one_process(runs):
    difference = max_difference(*runs, "rl.pt")
    assert difference < TOLERANCE, f"parameters after one RL step differ by {difference:.2e}"


def test_sharded_sampling_draws_the_same_tokens_as_one_process(runs):
    one, two = runs
    assert (one / "rollouts.json").read_text() == (two / "rollouts.json").read_text(), \
        "each row is seeded by its global request index, so which rank samples it must not matter"


@pytest.mark.parametrize("name", ["tirgen/tirgen_raw.jsonl", "tirgen/tirgen.jsonl", "tirgen/tirgen_stats.json",
                                  "run/eval/base-cot-tiny.jsonl", "run/eval/base-cot-tiny-heldout.jsonl"])
def test_tirgen_and_evaluation_write_the_same_files(runs, name):
    one, two = runs
    assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} differs between 1 and 2 ranks"


def test_summary_records_the_world_size_and_the_same_rows(runs):
    def rows(path):   # timings differ; everything else must not
        summary = json.loads((path / "run" / "summary.json").read_text())
        for row in summary["rows"]:
            for bench in row["benchmarks"].values():
                bench.pop("seconds")
        return summary
    one, two = rows(runs[0]), rows(runs[1])
    assert json.dumps(one["rows"]) == json.dumps(two["rows"]), "summary rows differ between 1 and 2 ranks"
    assert (one["world_size"], one["backend"]) == (1, "none"), "a single process records world size 1"
    assert (two["world_size"], two["backend"]) == (2, "gloo"), "the 2-rank run records its world size and backend"
    assert two["stages"]["eval"]["world_size"] == 2, "stages.json records the world size per stage"


def test_a_killed_rank_ends_the_run_and_resume_continues_on_any_number_of_ranks(tmp_path):
    started = time.time()
    result = torchrun("sft", tmp_path, "--kill-rank1-at", 3, timeout=120)
    seconds = time.time() - started
    assert result.returncode != 0, "a run that lost a rank must fail, not report success"
    assert seconds < 90, f"the surviving rank must end promptly, took {seconds:.0f} s"
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest in ("ckpt-0000002", "ckpt-0000003"), f"checkpoint {latest}: at most the step in flight is lost"
    logged = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    # the 2-rank FSDP2 checkpoint resumes in one process (to step 4), and that one on 2 ranks again (to 6)
    distributed_worker.sft_run(tmp_path, resume=True, kill_at=None, total_steps=4)   # world size 1, in this process
    resumed = torchrun("sft", tmp_path, "--resume")
    assert resumed.returncode == 0, f"--resume failed: {resumed.stderr[-3000:]}"
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()[logged:]
    steps = [json.loads(line)["step"] for line in rows]
    assert steps == list(range(int(latest[5:]) + 1, 7)), f"resume must continue after {latest} up to step 6: {steps}"
