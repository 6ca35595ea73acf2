"""The `Problem` record: one math problem with its gold answer(s), the value every stage passes around.

A primitive on its own so that both the loaders (`thor_min.data`) and the tiny world that generates
problems (`thor_min.tasks`) can import it without importing each other: data -> tasks -> problem.
Limits: answers are strings (graded by `thor_min.grader`); `kind` is free text.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One math problem with its reference answer(s)."""

    id: str                          # unique within its source, e.g. "math500-17" or "tiny-test-0042"
    question: str                    # the problem text shown to the model
    answer: str                      # canonical gold answer (LaTeX or plain), graded with grader.grade
    alternatives: tuple[str, ...] = ()  # other accepted forms of the gold answer
    reference: str = ""              # optional worked plain chain-of-thought ending in \boxed{answer}
    kind: str = ""                   # problem template (tiny world) or benchmark name

    @property
    def golds(self) -> tuple[str, ...]:
        """Every accepted form of the answer, canonical first."""
        return (self.answer, *self.alternatives)
