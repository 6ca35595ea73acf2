"""The trajectory format: fence tracking, observation blocks, segment splitting, cell extraction."""

import pytest

from thor_min.trajectory import Cell, FenceTracker, Rollout, extract_cells, observation_block, split_segments

TRAJECTORY = ("Let me compute.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n"
              "Then add one.\n```python\nx = 42\nprint(x + 1)\n```\n```output\n43\n```\nSo \\boxed{43}.")


def feed(tracker: FenceTracker, text: str, piece_size: int) -> list[str]:
    """Append `text` in pieces of `piece_size` chars; return every closed block's code."""
    closed = []
    for start in range(0, len(text), piece_size):
        closed += tracker.append(text[start:start + piece_size])
    return closed


# ----------------------------------------------------------------------------------------------
# FenceTracker


@pytest.mark.parametrize("piece_size", [1, 2, 3, 5, 7, 1000])
def test_fences_split_across_pieces_are_found(piece_size):
    text = "Compute.\n```python\nprint(6 * 7)\n```\nDone."
    closed = feed(FenceTracker(), text, piece_size)
    assert closed == ["print(6 * 7)"], f"piece size {piece_size}: got {closed}"


def test_two_blocks_are_reported_in_order():
    text = "```python\na = 1\nprint(a)\n```\ntext between\n```python\nprint(2)\n```\n"
    assert feed(FenceTracker(), text, 4) == ["a = 1\nprint(a)", "print(2)"]


def test_block_is_reported_at_the_piece_that_closes_it():
    tracker = FenceTracker()
    assert tracker.append("```python\nprint(1)") == []
    assert tracker.in_code, "an opened block must be reported as open"
    assert tracker.append("\n") == []
    assert tracker.append("```") == ["print(1)"], "the closing fence closes the block"
    assert not tracker.in_code


def test_fence_at_points_at_the_opening_fence():
    tracker = FenceTracker()
    tracker.append("abc\n```python\n")
    assert tracker.fence_at == 4 and tracker.text[tracker.fence_at:].startswith("```python")


def test_empty_block_closes_with_empty_code():
    assert FenceTracker().append("```python\n```\n") == [""]


def test_other_languages_do_not_open_a_block():
    assert feed(FenceTracker(), "```bash\nls\n```\n```output\n1\n```\n", 3) == []


def test_observation_containing_python_fence_does_not_open_a_block():
    tracker = FenceTracker()
    tracker.append("```python\nprint('```python')\n```\n")
    tracker.append_observation(observation_block("```python", tracker.text))
    assert not tracker.in_code, "text appended as an observation must never be parsed"
    assert tracker.append("So the answer.\n```\n") == [], "a fence after the observation must not close anything"


def test_truncate_to_just_after_an_observation_does_not_rescan_it():
    tracker = FenceTracker()
    tracker.append("```python\nprint(1)\n```\n")
    tracker.append_observation(observation_block("```python", tracker.text))
    end_of_observation = len(tracker.text)
    tracker.append("Then more text ")
    tracker.truncate(end_of_observation)
    assert tracker.text.endswith("```output\n```python\n```\n")
    assert tracker.append("done.\n") == [] and not tracker.in_code, \
        "a rollback to the end of an observation must not re-parse the observation as model text"


def test_truncate_inside_an_open_block_forgets_it_and_refinds_split_fences():
    tracker = FenceTracker()
    tracker.append("Reason.\n```pyth")
    cut = len(tracker.text)
    tracker.append("on\nprint(1)")
    assert tracker.in_code
    tracker.truncate(cut)
    assert not tracker.in_code and tracker.text == "Reason.\n```pyth"
    assert tracker.append("on\nprint(2)\n```") == ["print(2)"], "a fence split by the cut is found again"


# ----------------------------------------------------------------------------------------------
# observation_block, split_segments, extract_cells


def test_observation_block_adds_a_leading_newline_only_when_needed():
    assert observation_block("42", "print(42)\n```") == "\n```output\n42\n```\n"
    assert observation_block("42", "print(42)\n```\n") == "```output\n42\n```\n", \
        "a closing fence token that already ends in a newline gets no extra newline"


def test_split_segments_covers_the_whole_text_in_order():
    segments = split_segments(TRAJECTORY)
    assert "".join(text for text, _ in segments) == TRAJECTORY, "segments must concatenate to the text"
    assert [is_observation for _, is_observation in segments] == [False, True, False, True, False]
    observations = [text for text, is_observation in segments if is_observation]
    assert [o.strip("\n") for o in observations] == ["```output\n42\n```", "```output\n43\n```"]


def test_split_segments_round_trips_what_the_runtime_appended():
    model_text = "Compute.\n```python\nprint(42)\n```"          # a close token without its newline
    block = observation_block("42", model_text)
    segments = split_segments(model_text + block + "So 42.")
    assert segments == [(model_text, False), (block, True), ("So 42.", False)], \
        "the observation segment must be exactly the block observation_block() produced"


def test_split_segments_without_observations_is_one_segment():
    assert split_segments("plain text") == [("plain text", False)]
    assert split_segments("") == []


def test_extract_cells_finds_every_closed_block_and_ignores_observations():
    text = TRAJECTORY.replace("```output\n43\n```", "```output\n```python\n```")
    assert extract_cells(text) == ["print(6 * 7)", "x = 42\nprint(x + 1)"]


def test_extract_cells_ignores_an_unclosed_block():
    assert extract_cells("```python\nprint(1)\n```\n```python\nprint(2)") == ["print(1)"]


# ----------------------------------------------------------------------------------------------
# Records


def test_rollout_failed_cell_and_executed_cells():
    cells = [Cell("print(1)", True, True, "1", 0, 5, 9), Cell("1/0", False, True, "ZeroDivisionError", 10, 15, 20),
             Cell("print(3)", False, False, "", 21, 25, 25)]
    rollout = Rollout(request=0, sample=0, prompt_ids=[1], cells=cells)
    assert rollout.failed_cell is cells[1]
    assert rollout.executed_cells == cells[:2], "a cell that was never executed is not an executed cell"
