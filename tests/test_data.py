"""Problem loaders: bundled benchmarks, local JSONL, hf: datasets, the tiny world, clear errors."""

import json

import pytest

from thor_min import tasks
from thor_min.data import DataError, Problem, load_problems

BENCHMARK_SIZES = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675, "gsm8k": 1319}


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("name, size", BENCHMARK_SIZES.items())
def test_bundled_benchmark_loads_every_row(name, size):
    problems = load_problems(name)
    assert len(problems) == size, f"{name}: {len(problems)} problems, expected {size}"


@pytest.mark.parametrize("name", BENCHMARK_SIZES)
def test_bundled_benchmark_rows_are_complete_and_unique(name):
    problems = load_problems(name)
    assert all(p.question and p.answer and p.kind == name for p in problems), f"{name}: empty field or wrong kind"
    assert len({p.id for p in problems}) == len(problems), f"{name}: duplicate ids"


def test_list_answers_become_alternatives():
    with_alternatives = [p for p in load_problems("minerva") if p.alternatives]
    assert with_alternatives and all(p.answer not in p.alternatives for p in with_alternatives), \
        "minerva list answers must give a canonical answer plus distinct alternatives"


def test_limit_takes_the_first_problems():
    assert [p.id for p in load_problems("math500", limit=3)] == [p.id for p in load_problems("math500")[:3]], \
        "limit=3 must return the first three problems"


def test_local_jsonl_maps_fields(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"problem": "1+1?", "answer": 2},
        {"id": "q7", "problem": "Half?", "answer": ["\\frac12", "0.5"]},
    ])
    assert load_problems(str(path)) == [
        Problem(id="mine-0", question="1+1?", answer="2", kind="mine"),
        Problem(id="q7", question="Half?", answer="\\frac12", alternatives=("0.5",), kind="mine"),
    ], "numbers become strings, lists become answer + alternatives, missing ids are generated"


@pytest.mark.parametrize("bad_row, message", [
    ("{not json", "invalid JSON"),
    ({"answer": "3"}, "missing field 'problem'"),
    ({"problem": "2+1?"}, "missing field 'answer'"),
    ({"problem": "   ", "answer": "3"}, "empty"),
    ({"problem": "2+1?", "answer": ""}, "empty answer"),
    ({"problem": "2+1?", "answer": []}, "empty answer list"),
    ('["a list"]', "expected a JSON object"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"}, "", bad_row])
    with pytest.raises(ValueError) as error:
        load_problems(str(path))
    assert f"{path}:3" in str(error.value) and message in str(error.value), \
        f"error {error.value!s:.200} must name {path}:3 and say {message!r}"


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as error:
        load_problems("math5000")
    text = str(error.value)
    assert "\n" not in text and all(name in text for name in (*BENCHMARK_SIZES, "tiny", "hf:")), \
        f"one line listing the valid names, got {text!r}"


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot read problems from"):
        load_problems(str(tmp_path / "absent.jsonl"))


def test_hf_without_network_says_to_use_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load_problems("hf:org/set")
    assert "\n" not in str(error.value) and "local .jsonl" in str(error.value), \
        f"one line that suggests a local .jsonl, got {error.value!r}"


def test_hf_maps_common_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(repo, config, split):
        calls.append((repo, config, split))
        return [{"question": "Janet has 3 eggs...", "answer": "3 + 4 = 7\n#### 7"},
                {"Problem": "Compute 1/2.", "solution": "It is $\\boxed{\\frac12}$."}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    problems = load_problems("hf:openai/gsm8k:main:test")
    assert calls == [("openai/gsm8k", "main", "test")], f"spec parsed wrongly: {calls}"
    assert [(p.question, p.answer) for p in problems] == [("Janet has 3 eggs...", "7"), ("Compute 1/2.", "\\frac12")], \
        "question/Problem and '#### 7' / boxed solution columns must map to question and answer"


def test_bad_hf_spec_is_a_clear_error():
    with pytest.raises(DataError, match="hf:OWNER/NAME"):
        load_problems("hf:no-owner")


@pytest.mark.parametrize("name, function", [("tiny", "test_split"), ("tiny-heldout", "heldout_split")])
def test_tiny_sources_are_the_tiny_world_splits(name, function):
    expected = getattr(tasks, function)()[:2]
    assert load_problems(name, limit=2) == expected, f"{name} must return tasks.{function}() (limited)"
