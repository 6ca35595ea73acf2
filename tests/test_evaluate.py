"""Evaluation: the summary metrics on hand-made records, and evaluate() end to end with a tiny trained model."""

import math

import pytest
import torch

from thor_min import tiny
from thor_min.bench.rollout import fit_texts
from thor_min.data import Problem
from thor_min.evaluate import EvalConfig, SampleRecord, evaluate, record_dict, summarise
from thor_min.rollout import RolloutEngine
from thor_min.sandbox import Sandbox

PASS, FAIL = {"code": "print(1)", "passed": True, "observation": "1"}, {"code": "1/0", "passed": False,
                                                                     "observation": "ZeroDivisionError"}


def record(problem: str, correct: bool, answer, cells=(), tokens=0, retries=0) -> SampleRecord:
    return SampleRecord(id=problem, problem=problem, gold="5", completion="", correct=correct, answer=answer,
                        cells=list(cells), tokens=tokens, retries=retries)


@pytest.fixture
def records():
    """2 problems x 3 samples. p1: the first sample is wrong and its cell failed; p2: the majority is wrong."""
    return [
        record("p1", False, "4", [FAIL], tokens=10, retries=2),
        record("p1", True, "5", [PASS], tokens=20),
        record("p1", True, "5", [], tokens=30),
        record("p2", False, "1", [FAIL], tokens=40),
        record("p2", True, "2", [PASS, PASS], tokens=50),
        record("p2", False, "1", [PASS], tokens=60),
    ]


def test_accuracy_is_avg_at_k_with_a_95_percent_interval(records):
    summary = summarise(records, samples=3)
    assert summary["problems"] == 2 and summary["samples"] == 3
    assert summary["accuracy"] == pytest.approx(0.5), "mean of per-problem accuracies 2/3 and 1/3"
    half = 1.96 * math.sqrt((2 * (1 / 6) ** 2) / 1 / 2)          # sample std over problems / sqrt(n)
    assert summary["ci95"] == pytest.approx([0.5 - half, 0.5 + half])


def test_pass_maj_and_best_of_n(records):
    summary = summarise(records, samples=3)
    assert summary["pass_at_k"] == 1.0, "each problem has a correct sample"
    assert summary["maj_at_k"] == 0.5, "p1's majority answer 5 is right, p2's majority answer 1 is wrong"
    assert summary["best_of_n"] == 1.0, "best-of-N skips samples with a failed cell and picks the first clean one"


def test_cell_rates_and_tokens(records):
    summary = summarise(records, samples=3)
    assert summary["cell_call_rate"] == pytest.approx(5 / 6), "5 of 6 samples executed a cell"
    assert summary["cell_pass_rate"] == pytest.approx(4 / 6), "4 of the 6 cells passed"
    assert summary["cells_per_sample"] == pytest.approx(1.0)
    assert summary["cell_attempts"] == pytest.approx((6 + 2) / 6), "self-correction retries count as attempts"
    assert summary["tokens"] == pytest.approx(35.0)


def test_summary_edge_cases():
    no_answers = [record("p", False, None), record("p", False, None)]
    summary = summarise(no_answers, samples=2)
    assert summary["maj_at_k"] == 0 and summary["best_of_n"] == 0 and summary["pass_at_k"] == 0
    assert math.isnan(summary["cell_pass_rate"]), "no cells: the pass rate is undefined, not 0"
    assert summarise([record("p", True, "5")], samples=1)["ci95"] == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------
# End to end

ANSWERS = {
    "A": "```python\nprint(2 + 3)\n```\n```output\n5\n```\nSo \\boxed{5}.",
    "B": "```python\nprint(1 / 0)\n```\n```output\nZeroDivisionError: division by zero\n```\nSo \\boxed{0}.",
    "C": "No code is needed, so \\boxed{7}.",
}
GOLDS = {"A": "5", "B": "1", "C": "7"}


@pytest.fixture(scope="module")
def engine_parts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # tiny models: one thread is faster and never thrashes
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128))
    fit_texts(model, tokenizer, [f"Question: {k}\nAnswer:\n{v}" for k, v in ANSWERS.items()], steps=300, lr=1e-2)
    yield model, tokenizer
    torch.set_num_threads(threads)


def test_evaluate_end_to_end_with_tools(engine_parts):
    model, tokenizer = engine_parts
    kinds = {"A": "odd", "B": "even", "C": "odd"}
    problems = [Problem(id=f"t-{k}", question=k, answer=GOLDS[k], kind=kinds[k]) for k in ANSWERS]
    with Sandbox(workers=2, timeout=10.0, preload=()) as sandbox:
        config = EvalConfig(samples=2, temperature=0.0, max_new_tokens=80, max_tool_calls=2, batch_size=4)
        records, summary = evaluate(RolloutEngine(model, tokenizer, sandbox), problems, "tiny", config)
    assert [r.kind for r in records[::2]] == ["odd", "even", "odd"], "each record names its problem's kind"
    assert summary["kinds"] == {"odd": 1.0, "even": 0.0}, f"accuracy per kind: {summary['kinds']}"
    assert [r.id for r in records] == ["t-A", "t-A", "t-B", "t-B", "t-C", "t-C"], "k samples per problem, in order"
    assert [r.correct for r in records] == [True, True, False, False, True, True]
    assert records[0].completion == ANSWERS["A"] and records[0].answer == "5" and records[0].gold == "5"
    assert records[2].cells[0]["passed"] is False and "ZeroDivisionError" in records[2].cells[0]["observation"]
    written = tokenizer.encode("```python\nprint(2 + 3)\n```\n") + tokenizer.encode("So \\boxed{5}.")
    assert records[0].tokens == len(written) + 1, "tokens = sampled tokens (with EOS), observation excluded"
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["pass_at_k"] == pytest.approx(2 / 3)
    assert summary["cell_call_rate"] == pytest.approx(4 / 6) and summary["cell_pass_rate"] == pytest.approx(0.5)
    assert set(record_dict(records[0])) >= {"id", "problem", "gold", "completion", "correct", "cells", "tokens"}


def test_evaluate_without_tools_runs_no_cells(engine_parts):
    model, tokenizer = engine_parts
    problems = [Problem(id="t-A", question="A", answer="5")]
    config = EvalConfig(samples=1, temperature=0.0, max_new_tokens=40)
    records, summary = evaluate(RolloutEngine(model, tokenizer), problems, "tiny", config, tools=False)
    assert records[0].cells == [] and summary["cell_call_rate"] == 0.0
    assert "```python" in records[0].completion, "the model writes code, but nothing runs it"


def test_evaluate_rejects_an_empty_problem_list(engine_parts):
    model, tokenizer = engine_parts
    with pytest.raises(ValueError, match="no problems"):
        evaluate(RolloutEngine(model, tokenizer), [], "tiny", EvalConfig())

