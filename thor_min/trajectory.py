"""The THOR trajectory format, and the record every rollout produces.

A trajectory is plain text (THOR.md section 1): reasoning, then a cell

    ```python
    print(4821 * 37)
    ```

then the runtime appends the observation block "\\n```output\\n178377\\n```\\n" and the model continues,
ending with a `\\boxed{}` answer. This module holds the pieces of that format that several stages share:

- `FenceTracker` watches a row's decoded text as it grows and reports each closed python block (the
  engine calls it per sampled token; TIRGen's critic loop uses it too);
- `observation_block` renders what the runtime appends after a cell;
- `split_segments` cuts a finished text into model-written and observation segments, so SFT tokenises
  a trajectory exactly the way the engine produced it (each observation tokenised on its own);
- `Cell` and `Rollout` are the records passed from the engine to the trainers and the evaluator.

Limits: a block opens with "```python" + newline and closes at the next line starting with "```";
nested fences inside code are not supported (as in THOR).
"""

import re
from dataclasses import dataclass, field

CODE_OPEN = re.compile(r"```python[ \t]*\n")
CODE_CLOSE = "\n```"
OUTPUT_SEGMENT = re.compile(r"\n?```output\n.*?\n```\n", re.DOTALL)


def observation_block(observation: str, text_so_far: str) -> str:
    """What the runtime appends after a closed cell: "\\n```output\\n{obs}\\n```\\n".

    The leading newline is omitted when the model's text already ends with one (some tokenizers emit
    the closing fence and its newline as a single token).
    """
    lead = "" if text_so_far.endswith("\n") else "\n"
    return f"{lead}```output\n{observation}\n```\n"


def split_segments(text: str) -> list[tuple[str, bool]]:
    """Cut a trajectory into (segment, is_observation) pieces, in order, covering the whole text."""
    segments: list[tuple[str, bool]] = []
    position = 0
    for match in OUTPUT_SEGMENT.finditer(text):
        if match.start() > position:
            segments.append((text[position:match.start()], False))
        segments.append((match.group(0), True))
        position = match.end()
    if position < len(text):
        segments.append((text[position:], False))
    return segments


def extract_cells(text: str) -> list[str]:
    """The code of every closed python block of a finished text, in order."""
    tracker = FenceTracker()
    codes = []
    for segment, is_observation in split_segments(text):
        if is_observation:
            tracker.append_observation(segment)
        else:
            codes.extend(tracker.append(segment))
    return codes


class FenceTracker:
    """Incrementally finds closed ```python blocks in text that grows piece by piece."""

    def __init__(self) -> None:
        self.text = ""
        self.open_at: int | None = None    # char index where the open block's code starts
        self.fence_at: int | None = None   # char index of the open block's "```python"
        self.scan_from = 0                 # where to look for the next opening fence
        self.parse_floor = 0               # end of the last observation: never scanned again

    def append(self, piece: str) -> list[str]:
        """Add model-written text; return the code of each block that this piece closed."""
        self.text += piece
        closed = []
        while True:
            if self.open_at is None:
                match = CODE_OPEN.search(self.text, self.scan_from)
                if match is None:
                    # keep a margin so a fence split across pieces is still found
                    self.scan_from = max(self.scan_from, len(self.text) - 16)
                    return closed
                self.fence_at, self.open_at = match.start(), match.end()
            end = self.text.find(CODE_CLOSE, self.open_at - 1)
            if end < 0:
                return closed
            closed.append(self.text[self.open_at:max(end, self.open_at)])
            self.scan_from, self.open_at = end + len(CODE_CLOSE), None

    def append_observation(self, block: str) -> None:
        """Add runtime text (an output block); it is never parsed for fences."""
        self.text += block
        self.scan_from = self.parse_floor = len(self.text)

    def truncate(self, length: int) -> None:
        """Roll the text back to `length` chars (a point outside any block, e.g. for self-correction)."""
        self.text = self.text[:length]
        self.open_at = self.fence_at = None
        self.parse_floor = min(self.parse_floor, length)
        # re-scan a margin before the cut (a fence split across pieces) but never an observation
        self.scan_from = max(min(self.scan_from, length - 16), self.parse_floor, 0)

    @property
    def in_code(self) -> bool:
        return self.open_at is not None


@dataclass
class Cell:
    """One python block of a rollout. Token indices are into `Rollout.completion_ids`."""

    code: str
    passed: bool
    executed: bool               # False when over the tool budget or in step mode without execution
    observation: str             # the observation text (empty when nothing was appended)
    fence_token: int             # index of the token where "```python" starts
    close_token: int             # index just after the token that closed the block
    output_end: int              # index just after the appended observation tokens (== close_token if none)
    error: str = ""              # the error line of a failed cell


@dataclass
class Rollout:
    """One sampled completion with the token-level facts the trainers need."""

    request: int                     # index of the request (prompt) it answers
    sample: int                      # index within the request's group
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)     # 1 = sampled by the policy, 0 = forced (observation)
    logprobs: list[float] = field(default_factory=list)    # sampling log-prob of each token (0.0 where forced)
    cells: list[Cell] = field(default_factory=list)
    finish_reason: str = ""          # eos | length | budget | cell_error | cell (step mode) | stop
    text: str = ""                   # decoded completion, observations included
    sampled_tokens: int = 0          # every token the policy sampled, discarded retries included
    retries: int = 0                 # self-correction resamples

    @property
    def failed_cell(self) -> Cell | None:
        """The first executed cell that failed, if any."""
        return next((cell for cell in self.cells if cell.executed and not cell.passed), None)

    @property
    def executed_cells(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.executed]
