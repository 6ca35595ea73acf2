"""The tiny world: a seeded generator of math problems where exact computation decides the answer.

Why it exists: this machine has no model hub and two CPU cores, yet the README's main command must run
the whole THOR pipeline (pretrain -> TIRGen -> SFT -> RL -> eval) and show real learning. A model of
about a million parameters learns the *format* of these solutions quickly but cannot multiply
multi-digit numbers, exactly like a base LLM that "knows what to do" but slips on arithmetic. A python
cell fixes the arithmetic, so tools matter here for the same reason they matter in THOR.

Each problem has an integer answer and a plain chain-of-thought reference made of *statements*, one per
line, each `EXPRESSION = VALUE.`, ending with `The answer is \\boxed{N}.` The expression notation is a
small language (products, differences, exact quotients, `b^e mod m`, `gcd(a, b)`, `lcm(a, b)`,
`1^2 + 2^2 + ... + n^2`, `a + (a+1) + ... + b` written `a + ... + b`) that `statement_code` translates to a
python cell; TIRGen's rule-based critic uses that translation.

Templates: six one-step skills (products of 4 x 3 digits, modular powers, sums of ranges and of squares,
gcd, lcm) and three two-step ones (linear equations: a difference then a quotient; word problems: containers
of items minus those sold, a product then a difference; a group minus its extras split into equal units, a
difference then a quotient). Word problems draw their nouns from a few trained `SCENES`, so a model can learn
that the nouns vary and the structure decides the computation.

Held-out templates (`HELDOUT_TEMPLATES`) measure generalisation and never appear in training: the two word-problem
structures told in `HELDOUT_SCENE`, whose nouns (farm, crates, eggs, guides, campers, buses) no training
question uses (`crates`, `buses`), and one new composition, a product followed by an addition (`orchard`: no
trained template adds two numbers). So the first two test whether trained skills transfer to unseen wording;
the third whether they compose into an unseen chain (the tiny model is not expected to manage that).

Splits are deterministic and disjoint by construction: a problem belongs to the test split iff a stable
hash of its question text falls in the test bucket, and the train generator rejects such problems.

Limits: integer answers only; the wording is templated (a language model can overfit the phrasing,
which is exactly what the held-out templates measure).
"""

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

from thor_min.problem import Problem

TEST_BUCKETS = 10          # 1 in TEST_BUCKETS question hashes belongs to the test split
DEFAULT_SEED = 1234
DEFAULT_TEST_SIZE = 200
DEFAULT_HELDOUT_SIZE = 120
MAX_REJECTIONS = 10_000     # consecutive rejected draws before a split is declared impossible


@dataclass(frozen=True)
class Statement:
    """One computation in a reference solution: `expression = value`."""

    expression: str   # in the world's notation, e.g. "7^222 mod 1000"
    value: int


@dataclass(frozen=True)
class Template:
    """A problem family: `generate(rng)` returns (question, statements); the answer is the last value."""

    name: str
    generate: Callable[[random.Random], tuple[str, list[Statement]]]


# ----------------------------------------------------------------------------------------------
# Train templates


def _product(rng: random.Random) -> tuple[str, list[Statement]]:
    a, b = rng.randint(100, 9999), rng.randint(10, 999)
    return f"What is {a} * {b}?", [Statement(f"{a} * {b}", a * b)]


def _modpow(rng: random.Random) -> tuple[str, list[Statement]]:
    base, exponent, modulus = rng.randint(2, 20), rng.randint(10, 300), rng.choice([100, 1000])
    question = f"What is the remainder when {base}^{exponent} is divided by {modulus}?"
    return question, [Statement(f"{base}^{exponent} mod {modulus}", pow(base, exponent, modulus))]


def _sum_squares(rng: random.Random) -> tuple[str, list[Statement]]:
    n = rng.randint(10, 999)
    total = n * (n + 1) * (2 * n + 1) // 6
    question = f"What is the sum of the squares of the integers from 1 to {n}?"
    return question, [Statement(f"1^2 + 2^2 + ... + {n}^2", total)]


def _sum_range(rng: random.Random) -> tuple[str, list[Statement]]:
    low = rng.randint(10, 500)
    high = low + rng.randint(20, 900)
    question = f"What is the sum of all integers from {low} to {high}?"
    return question, [Statement(f"{low} + ... + {high}", sum(range(low, high + 1)))]


def _linear(rng: random.Random) -> tuple[str, list[Statement]]:
    a, x, b = rng.randint(2, 99), rng.randint(10, 999), rng.randint(10, 999)
    c = a * x + b
    question = f"Solve for x: {a}x + {b} = {c}."
    return question, [Statement(f"{c} - {b}", c - b), Statement(f"{c - b} / {a}", x)]


def _gcd(rng: random.Random) -> tuple[str, list[Statement]]:
    g, p, r = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 99)
    a, b = g * p, g * r
    return f"What is the greatest common divisor of {a} and {b}?", [Statement(f"gcd({a}, {b})", math.gcd(a, b))]


def _lcm(rng: random.Random) -> tuple[str, list[Statement]]:
    a, b = rng.randint(12, 999), rng.randint(12, 999)
    return f"What is the least common multiple of {a} and {b}?", [Statement(f"lcm({a}, {b})", math.lcm(a, b))]


@dataclass(frozen=True)
class Scene:
    """The nouns of a word problem: a place holding containers of items, or a group split into units."""

    place: str
    container: str
    containers: str
    items: str
    extras: str
    members: str
    units: str


# Trained scenes; the held-out templates use HELDOUT_SCENE, whose nouns never occur in a training question.
SCENES = (Scene("shop", "box", "boxes", "pens", "coaches", "players", "teams"),
          Scene("bakery", "tray", "trays", "rolls", "teachers", "pupils", "classes"),
          Scene("library", "shelf", "shelves", "books", "drivers", "riders", "vans"))
HELDOUT_SCENE = Scene("farm", "crate", "crates", "eggs", "guides", "campers", "buses")


def _left(rng: random.Random, scene: Scene) -> tuple[str, list[Statement]]:
    """Containers of items, some sold: a product, then a difference."""
    boxes, per = rng.randint(12, 99), rng.randint(12, 99)
    total = boxes * per
    sold = rng.randint(10, total - 1)
    question = (f"A {scene.place} has {boxes} {scene.containers} with {per} {scene.items} in each {scene.container}. "
                f"It sells {sold} {scene.items}. How many {scene.items} are left?")
    return question, [Statement(f"{boxes} * {per}", total), Statement(f"{total} - {sold}", total - sold)]


def _groups(rng: random.Random, scene: Scene) -> tuple[str, list[Statement]]:
    """A group minus its extras, split into equal units: a difference, then a quotient."""
    team, teams, extra = rng.randint(3, 12), rng.randint(20, 300), rng.randint(10, 500)
    members = team * teams + extra
    question = (f"A group has {members} people. {extra} of them are {scene.extras} and the rest are {scene.members}. "
                f"The {scene.members} form {scene.units} of {team}. How many {scene.units} are there?")
    return question, [Statement(f"{members} - {extra}", team * teams), Statement(f"{team * teams} / {team}", teams)]


def _boxes(rng: random.Random) -> tuple[str, list[Statement]]:
    return _left(rng, rng.choice(SCENES))


def _teams(rng: random.Random) -> tuple[str, list[Statement]]:
    return _groups(rng, rng.choice(SCENES))


TEMPLATES: tuple[Template, ...] = (
    Template("product", _product),
    Template("modpow", _modpow),
    Template("sum-squares", _sum_squares),
    Template("sum-range", _sum_range),
    Template("linear", _linear),
    Template("gcd", _gcd),
    Template("lcm", _lcm),
    Template("boxes", _boxes),
    Template("teams", _teams),
)

# ----------------------------------------------------------------------------------------------
# Held-out templates: known operations, wordings never seen in training


def _crates(rng: random.Random) -> tuple[str, list[Statement]]:
    return _left(rng, HELDOUT_SCENE)


def _buses(rng: random.Random) -> tuple[str, list[Statement]]:
    return _groups(rng, HELDOUT_SCENE)


def _orchard(rng: random.Random) -> tuple[str, list[Statement]]:
    """A new composition: a product (trained), then a sum of two numbers (no trained template adds)."""
    rows, per, extra = rng.randint(12, 99), rng.randint(12, 99), rng.randint(10, 999)
    question = (f"An orchard has {rows} rows of {per} trees and {extra} more trees by the gate. "
                f"How many trees are there in total?")
    return question, [Statement(f"{rows} * {per}", rows * per), Statement(f"{rows * per} + {extra}", rows * per + extra)]


HELDOUT_TEMPLATES: tuple[Template, ...] = (
    Template("crates", _crates),
    Template("buses", _buses),
    Template("orchard", _orchard),
)

# ----------------------------------------------------------------------------------------------
# Reference solutions and the notation -> python translation


def reference_solution(statements: list[Statement]) -> str:
    """The plain chain-of-thought: one `expression = value.` line per statement, then the boxed answer."""
    lines = [f"{s.expression} = {s.value}." for s in statements]
    lines.append(f"The answer is \\boxed{{{statements[-1].value}}}.")
    return "\n".join(lines)


_INT = r"(-?[0-9]+)"
_NOTATION: tuple[tuple[re.Pattern, Callable[..., str]], ...] = (
    (re.compile(rf"^{_INT}\^{_INT} mod {_INT}$"), lambda b, e, m: f"print(pow({b}, {e}, {m}))"),
    (re.compile(rf"^1\^2 \+ 2\^2 \+ \.\.\. \+ {_INT}\^2$"),
     lambda n: f"print(sum(k**2 for k in range(1, {n} + 1)))"),
    (re.compile(rf"^{_INT} \+ \.\.\. \+ {_INT}$"), lambda a, b: f"print(sum(range({a}, {b} + 1)))"),
    (re.compile(rf"^gcd\({_INT}, {_INT}\)$"), lambda a, b: f"import math\nprint(math.gcd({a}, {b}))"),
    (re.compile(rf"^lcm\({_INT}, {_INT}\)$"), lambda a, b: f"import math\nprint(math.lcm({a}, {b}))"),
    (re.compile(rf"^{_INT} / {_INT}$"), lambda a, b: f"print({a} // {b})"),
    (re.compile(rf"^{_INT} ([*+-]) {_INT}$"), lambda a, op, b: f"print({a} {op} {b})"),
)

STATEMENT_RE = re.compile(r"^(?P<expression>[^=\n]+?) = (?P<value>-?[0-9]+)\.$")


def statement_code(expression: str) -> str | None:
    """Translate one expression of the world's notation into a python cell, or None if it is not one."""
    expression = expression.strip()
    for pattern, render in _NOTATION:
        match = pattern.match(expression)
        if match:
            return render(*match.groups())
    return None


def restates_question(problem: Problem, response: str) -> bool:
    """Does the response's first line state the problem's first computation (operands copied right)?

    A format check, not a correctness check: the tiny base is pretrained until it copies the numbers of a
    question into its first statement (its arithmetic may still be wrong, as a real base model's is).
    """
    expected = problem.reference.split("\n", 1)[0].split(" = ", 1)[0]
    return response.split("\n", 1)[0].split(" = ", 1)[0] == expected


# ----------------------------------------------------------------------------------------------
# Splits


def _is_test(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return digest[0] % TEST_BUCKETS == 0


def _make(template: Template, rng: random.Random, problem_id: str) -> Problem:
    question, statements = template.generate(rng)
    return Problem(id=problem_id, question=question, answer=str(statements[-1].value),
                   reference=reference_solution(statements), kind=template.name)


def generate_problems(split: str, n: int, seed: int = DEFAULT_SEED) -> list[Problem]:
    """`n` problems of `split` ("train", "test" or "heldout"), cycling through the templates.

    Deterministic in (split, n, seed); train and test never share a question (hash buckets), and
    held-out problems come from templates that never appear in train or test. Evaluation splits hold
    distinct questions; the train split may repeat one (it is a sample stream, as large as asked).
    """
    if split not in ("train", "test", "heldout"):
        raise ValueError(f"unknown tiny-world split {split!r}: use train, test or heldout")
    templates = HELDOUT_TEMPLATES if split == "heldout" else TEMPLATES
    rng = random.Random(f"{seed}-{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    rejected_in_a_row = 0
    while len(problems) < n:
        if rejected_in_a_row > MAX_REJECTIONS:
            raise ValueError(f"could not draw {n} distinct {split} problems: template "
                             f"{templates[len(problems) % len(templates)].name!r} ran out of distinct questions")
        template = templates[len(problems) % len(templates)]
        problem = _make(template, rng, f"tiny-{split}-{len(problems):05d}")
        wrong_split = split != "heldout" and _is_test(problem.question) != (split == "test")
        if wrong_split or (split != "train" and problem.question in seen):
            rejected_in_a_row += 1
            continue
        rejected_in_a_row = 0
        seen.add(problem.question)
        problems.append(problem)
    return problems


def train_split(n: int, seed: int = DEFAULT_SEED) -> list[Problem]:
    """Training problems (pretraining corpus, TIRGen prompts, RL prompts)."""
    return generate_problems("train", n, seed)


def test_split(n: int = DEFAULT_TEST_SIZE, seed: int = DEFAULT_SEED) -> list[Problem]:
    """Held-out problems from the training templates (the evaluation set)."""
    return generate_problems("test", n, seed)


def heldout_split(n: int = DEFAULT_HELDOUT_SIZE, seed: int = DEFAULT_SEED) -> list[Problem]:
    """Problems from templates never seen in training (generalisation)."""
    return generate_problems("heldout", n, seed)
