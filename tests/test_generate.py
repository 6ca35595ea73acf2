"""generate.py: problem mode and benchmark mode on a tiny trained model dir (its main in this process, as the
interpreter would run it, without paying for another interpreter's start-up); bad input -> exit 2."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from thor_min import tiny
from thor_min.bench.rollout import fit_texts
from thor_min.models import save_model_dir

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = {
    "A": "```python\nprint(2 + 3)\n```\n```output\n5\n```\nSo \\boxed{5}.",
    "B": "```python\nprint(1 / 0)\n```\n```output\nZeroDivisionError: division by zero\n```\nSo \\boxed{0}.",
    "C": "No code is needed, so \\boxed{7}.",
}
FAST = ["--temperature", "0", "--max-new-tokens", "60", "--workers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory (weights, tokenizer, thor_min.json with template 'tiny') that writes cells."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128))
    fit_texts(model, tokenizer, [f"Question: {k}\nAnswer:\n{v}" for k, v in ANSWERS.items()], steps=300, lr=1e-2)
    torch.set_num_threads(threads)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("tiny-model"), template="tiny")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = [{"id": "a", "problem": "A", "answer": "5"}, {"id": "b", "problem": "B", "answer": 1},
            {"id": "c", "question": "C", "answer": ["7", "seven"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def cli():
    """generate.py imported as a module: its main runs in this process."""
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_cli(cli, capfd):
    """generate.py's main on these flags, on 1 torch thread: (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            torch.set_num_threads(threads)
        captured = capfd.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.mark.slow
def test_problem_mode_prints_code_and_outputs(run_cli, model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, stderr = run_cli("--model", str(model_dir), "A", "C", "--out", str(out), *FAST)
    assert code == 0, stderr
    assert "```python\nprint(2 + 3)\n```\n```output\n5\n```" in stdout, "code and its output are shown"
    assert "answer: 5 | cells: 1 (1 passed)" in stdout and "answer: 7 | cells: 0" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem"] for r in records] == ["A", "C"] and records[0]["cells"][0]["observation"] == "5"


@pytest.mark.slow
def test_benchmark_mode_writes_samples_and_summary(run_cli, model_dir, data_file, tmp_path):
    out, summary_path = tmp_path / "out" / "samples.jsonl", tmp_path / "summary.json"
    code, stdout, stderr = run_cli("--model", str(model_dir), "--data", str(data_file), "--samples", "2", "--out",
                                   str(out), "--summary", str(summary_path), *FAST)
    assert code == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6, "one JSON object per sample"
    for record in records:
        assert {"id", "problem", "gold", "completion", "correct", "cells", "tokens"} <= set(record)
    assert [r["correct"] for r in records] == [True, True, False, False, True, True]
    assert "```output\n5\n```" in records[0]["completion"], "completions include the observations"
    summary = json.loads(summary_path.read_text())
    for key in ("accuracy", "ci95", "pass_at_k", "maj_at_k", "best_of_n", "cell_call_rate", "cell_pass_rate",
                "tokens", "problems", "samples"):
        assert key in summary, f"summary lacks {key}"
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["problems"] == 3
    assert "accuracy (avg@2)" in stdout and "pass@2" in stdout, "the summary table is printed"


@pytest.mark.slow
def test_unknown_model_is_one_line_and_exit_2(run_cli):
    code, _, stderr = run_cli("--model", "no-such-model", "What is 1+1?")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "no-such-model" in stderr, stderr
    assert "Traceback" not in stderr


def assert_one_line_error(cli, capsys, argv, expected: str) -> None:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{argv}: exit status {code}"
    assert len(err.splitlines()) == 1 and expected in err, f"{argv}: {err!r}"


def test_bad_inputs_are_one_line_errors(cli, capsys, tmp_path, model_dir):
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"problem": "A", "answer": "5"}\n{"problem": "B", \n')
    cases = [
        (["--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--model", str(model_dir), "--data", str(malformed)], "bad.jsonl:2"),
        (["--model", str(model_dir), "--bench", "no-such-bench"], "unknown problem source"),
        (["--model", str(model_dir), "--template", "fancy", "A"], "unknown template"),
        (["--model", str(model_dir)], "give problem texts"),
        (["--model", str(model_dir), "A", "--bench", "math500"], "exactly one"),
        (["--model", str(model_dir), "A", "--temperature", "-1"], "--temperature"),
    ]
    for argv, expected in cases:
        assert_one_line_error(cli, capsys, argv, expected)
