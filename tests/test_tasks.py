"""The tiny world (thor_min.tasks): deterministic disjoint splits, true references, an exact notation."""

import contextlib
import io
import random
import re
from collections import Counter

import pytest

from thor_min import tasks
from thor_min.tasks import STATEMENT_RE, statement_code

TRAIN_NAMES = {t.name for t in tasks.TEMPLATES}
HELDOUT_NAMES = {t.name for t in tasks.HELDOUT_TEMPLATES}
PER_TEMPLATE = 300     # problems of each template checked by the exec test
N_TRAIN = 5000         # train problems checked against the test split
N_TEST = 800           # 4x the default; the capacity is ~846 (sum-squares has only 94 test-bucket questions)


@pytest.fixture(scope="module")
def train():
    return tasks.train_split(N_TRAIN)


@pytest.fixture(scope="module")
def test():
    return tasks.test_split(N_TEST)


@pytest.fixture(scope="module")
def heldout():
    return tasks.heldout_split(PER_TEMPLATE * len(tasks.HELDOUT_TEMPLATES))


@pytest.fixture(scope="module")
def every_split(train, test, heldout):
    return {"train": train, "test": test, "heldout": heldout}


# ----------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_same_seed_gives_the_same_problems(split):
    first, second = tasks.generate_problems(split, 300, seed=7), tasks.generate_problems(split, 300, seed=7)
    assert first == second, f"{split}: two calls with seed 7 gave different problems"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_different_seeds_give_different_problems(split):
    a, b = tasks.generate_problems(split, 50, seed=1), tasks.generate_problems(split, 50, seed=2)
    assert {p.question for p in a} != {p.question for p in b}, f"{split}: seeds 1 and 2 gave the same questions"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_a_smaller_split_is_a_prefix_of_a_larger_one(split):
    small, large = tasks.generate_problems(split, 40), tasks.generate_problems(split, 120)
    assert small == large[:40], f"{split}: the first 40 of 120 problems differ from a 40-problem split"


def test_train_and_test_share_no_question(train, test):
    shared = {p.question for p in train} & {p.question for p in test}
    assert not shared, f"{len(shared)} questions in both train and test, e.g. {sorted(shared)[:3]}"


def test_default_test_split_shares_no_question_with_train(train):
    shared = {p.question for p in train} & {p.question for p in tasks.test_split()}
    assert not shared, f"{len(shared)} questions in both train and the default test split"


def test_heldout_kinds_never_appear_in_train_or_test(train, test, heldout):
    assert not TRAIN_NAMES & HELDOUT_NAMES, f"template names shared: {TRAIN_NAMES & HELDOUT_NAMES}"
    train_test_kinds = {p.kind for p in train + test}
    heldout_kinds = {p.kind for p in heldout}
    assert train_test_kinds <= TRAIN_NAMES, f"train/test kinds outside TEMPLATES: {train_test_kinds - TRAIN_NAMES}"
    assert heldout_kinds == HELDOUT_NAMES, f"held-out kinds {heldout_kinds} != HELDOUT_TEMPLATES {HELDOUT_NAMES}"
    assert not {p.question for p in heldout} & {p.question for p in train + test}, \
        "a held-out question also appears in train or test"


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_eval_splits_hold_distinct_questions(every_split, split):
    questions = [p.question for p in every_split[split]]
    repeated = [q for q, count in Counter(questions).items() if count > 1]
    assert not repeated, f"{split}: {len(repeated)} repeated questions, e.g. {repeated[:2]}"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_ids_are_unique(every_split, split):
    ids = [p.id for p in every_split[split]]
    assert len(set(ids)) == len(ids), f"{split}: {len(ids) - len(set(ids))} duplicate ids"


def test_ids_are_unique_across_splits(train, test, heldout):
    ids = [p.id for p in train + test + heldout]
    assert len(set(ids)) == len(ids), "an id is shared between splits"


def test_every_train_template_appears_in_train(train):
    missing = TRAIN_NAMES - {p.kind for p in train[:len(tasks.TEMPLATES)]}
    assert not missing, f"the first {len(tasks.TEMPLATES)} train problems miss templates {missing}"
    assert {p.kind for p in train} == TRAIN_NAMES, "train kinds differ from TEMPLATES"


def test_every_train_template_appears_in_test(test):
    assert {p.kind for p in test} == TRAIN_NAMES, "the test split must cover every training template"


def test_unknown_split_is_a_value_error():
    with pytest.raises(ValueError, match="unknown tiny-world split"):
        tasks.generate_problems("validation", 3)


# ------------------------------------------------------------------------------------ answers, references


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_answers_are_integer_strings(every_split, split):
    bad = [p.answer for p in every_split[split] if not re.fullmatch(r"-?\d+", p.answer)
           or str(int(p.answer)) != p.answer]
    assert not bad, f"{split}: answers that are not canonical integer strings: {bad[:5]}"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_reference_ends_with_the_boxed_answer(every_split, split):
    bad = [p.id for p in every_split[split]
           if p.reference.splitlines()[-1] != f"The answer is \\boxed{{{p.answer}}}."]
    assert not bad, f"{split}: references whose last line is not 'The answer is \\boxed{{answer}}.': {bad[:5]}"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_every_other_reference_line_is_a_statement(every_split, split):
    bad = [(p.id, line) for p in every_split[split] for line in p.reference.splitlines()[:-1]
           if not STATEMENT_RE.match(line)]
    assert not bad, f"{split}: non-final reference lines that do not match STATEMENT_RE: {bad[:3]}"
    assert all(len(p.reference.splitlines()) >= 2 for p in every_split[split]), \
        f"{split}: a reference with no statement line"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_last_statement_value_is_the_answer(every_split, split):
    bad = [p.id for p in every_split[split]
           if STATEMENT_RE.match(p.reference.splitlines()[-2])["value"] != p.answer]
    assert not bad, f"{split}: the last statement's value differs from Problem.answer: {bad[:5]}"


# ---------------------------------------------------------------------------- notation -> python translation


def run_cell(code: str) -> str:
    """What a python cell prints, run with plain exec in a fresh namespace."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, {"__name__": "__cell__"})  # noqa: S102 -- our own generated code
    return buffer.getvalue()


def test_statement_code_prints_every_statement_value(every_split):
    train_sample = tasks.train_split(PER_TEMPLATE * len(tasks.TEMPLATES), seed=99)
    checked = Counter()
    failures = []
    for problem in train_sample + every_split["test"] + every_split["heldout"]:
        for line in problem.reference.splitlines()[:-1]:
            match = STATEMENT_RE.match(line)
            code = statement_code(match["expression"])
            if code is None:
                failures.append((problem.kind, line, "no translation"))
                continue
            printed = run_cell(code)
            if printed != f"{match['value']}\n":
                failures.append((problem.kind, line, printed))
        checked[problem.kind] += 1
    assert not failures, f"{len(failures)} statements whose python cell does not print their value: {failures[:3]}"
    thin = {name: checked[name] for name in TRAIN_NAMES | HELDOUT_NAMES if checked[name] < PER_TEMPLATE}
    assert not thin, f"templates checked on fewer than {PER_TEMPLATE} problems: {thin}"


@pytest.mark.parametrize("expression, value", [
    ("7^222 mod 1000", pow(7, 222, 1000)),
    ("1^2 + 2^2 + ... + 10^2", 385),
    ("3 + ... + 5", 12),
    ("gcd(12, 18)", 6),
    ("lcm(4, 6)", 12),
    ("84 / 7", 12),
    ("12 * 34", 408),
    ("100 - 101", -1),
    ("-5 + 3", -2),
    ("  12 * 34  ", 408),
])
def test_statement_code_on_handwritten_expressions(expression, value):
    code = statement_code(expression)
    assert code is not None and run_cell(code) == f"{value}\n", f"{expression!r} -> {code!r} must print {value}"


@pytest.mark.parametrize("text", [
    "The answer is", "The answer is \\boxed{5}.", "hello", "5 * x", "", "12 * 34 = 408.", "3 *4",
    "1^2 + 2^2 + ... + x^2", "2 ** 10", "gcd(12 18)", "12 * 34\nimport os", "__import__('os')",
    "12 % 5",
])
def test_statement_code_rejects_non_statements(text):
    assert statement_code(text) is None, f"statement_code({text!r}) must be None, got {statement_code(text)!r}"


def test_statement_code_rejects_non_ascii_digits():
    arabic_indic_three = "\u0663"
    assert statement_code(f"{arabic_indic_three} * 4") is None, "non-ASCII digits are not the world's notation"


# -------------------------------------------------------------------------------------- impossible requests


def _one_question(rng: random.Random):
    rng.random()
    return "What is 1 * 1?", [tasks.Statement("1 * 1", 1)]


@pytest.mark.parametrize("split, attribute", [("heldout", "HELDOUT_TEMPLATES"), ("test", "TEMPLATES")])
def test_too_many_distinct_problems_is_a_clear_value_error(monkeypatch, split, attribute):
    monkeypatch.setattr(tasks, attribute, (tasks.Template("single", _one_question),))
    with pytest.raises(ValueError) as error:
        tasks.generate_problems(split, 2)
    message = str(error.value)
    assert "distinct" in message and split in message and "\n" not in message, \
        f"expected one line naming the split and 'distinct', got {message!r}"


def test_one_possible_question_is_still_enough_for_one_problem(monkeypatch):
    monkeypatch.setattr(tasks, "HELDOUT_TEMPLATES", (tasks.Template("single", _one_question),))
    problems = tasks.generate_problems("heldout", 1)
    assert [p.question for p in problems] == ["What is 1 * 1?"], "one question must satisfy n=1"


def test_an_impossible_request_gives_up_after_a_bounded_number_of_draws(monkeypatch):
    budget = 100_000
    calls = Counter()

    def counted(rng):
        calls["draws"] += 1
        if calls["draws"] > budget:
            raise RuntimeError(f"still drawing after {budget} attempts")
        return _one_question(rng)

    monkeypatch.setattr(tasks, "HELDOUT_TEMPLATES", (tasks.Template("single", counted),))
    with pytest.raises(ValueError, match="distinct"):
        tasks.generate_problems("heldout", 10_000)


def test_restates_question_checks_the_first_statement_only():
    problem = tasks.train_split(1)[0]
    first = problem.reference.split("\n")[0].split(" = ")[0]
    assert tasks.restates_question(problem, f"{first} = 12345.\nThe answer is \\boxed{{1}}."), \
        "copying the operands is enough, whatever the arithmetic says"
    assert not tasks.restates_question(problem, "1 * 2 = 2.\nThe answer is \\boxed{2}."), \
        "wrong operands do not restate the question"


def test_heldout_scene_nouns_never_occur_in_training_questions(train, test):
    nouns = {tasks.HELDOUT_SCENE.place, tasks.HELDOUT_SCENE.container, tasks.HELDOUT_SCENE.containers,
             tasks.HELDOUT_SCENE.items, tasks.HELDOUT_SCENE.extras, tasks.HELDOUT_SCENE.members,
             tasks.HELDOUT_SCENE.units}
    words = {word.strip(".?,") for p in train + test for word in p.question.split()}
    assert not nouns & words, f"held-out nouns seen in training questions: {nouns & words}"


def test_word_problems_use_every_trained_scene(train):
    places = {p.question.split()[1] for p in train if p.kind == "boxes"}
    assert places == {scene.place for scene in tasks.SCENES}, f"boxes questions use places {places}"
