"""TIRGen: the rule critic, the actor-critic loop (driven by a scripted actor), the multi-stage filter,
resumability, and the LLM critic on a tiny random model.

The issue's "done when": every ```output block of the produced tirgen.jsonl is exactly what running its
cell prints (checked by re-running every cell in a fresh sandbox).
"""

import json
from dataclasses import replace

import pytest
import torch

from thor_min import tasks, tiny
from thor_min.data import Problem
from thor_min.rollout import RolloutEngine
from thor_min.sandbox import ExecResult, Sandbox
from thor_min.tirgen import (CRITIC_INSTRUCTIONS, Attempt, LLMCritic, RuleCritic, TIRGenConfig, cell_is_nontrivial,
                             code_quality_ok, filter_attempts, format_ok, generate_attempts, is_repetitive)
from thor_min.tirgen_run import generate_rounds, part_path, run_tirgen, split_rounds
from thor_min.trajectory import Cell, Rollout, extract_cells, split_segments

SIZE = tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2)
FENCE = "```"




@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout=5.0) as box:
        yield box


def result(observation: str, passed: bool = True) -> ExecResult:
    return ExecResult(passed=passed, stdout=observation + "\n" if passed else "", stderr="", timed_out=False,
                      seconds=0.0, observation=observation, exit_code=0 if passed else 1,
                      error="" if passed else observation)


class FakeSandbox:
    """run_batch answers `print(...)` cells with a fixed value; codes containing `// 0` fail."""

    def __init__(self, value: str = "61"):
        self.value, self.batches = value, []

    def run_batch(self, codes):
        self.batches.append(list(codes))
        return [result("ZeroDivisionError: integer division or modulo by zero", passed=False) if "// 0" in code
                else result(self.value) for code in codes]


def cell(code: str, output: str) -> str:
    return f"{FENCE}python\n{code}\n{FENCE}\n{FENCE}output\n{output}\n{FENCE}\n"


def output_blocks(text: str) -> list[str]:
    return [segment.split(f"{FENCE}output\n", 1)[1].rsplit(f"\n{FENCE}", 1)[0]
            for segment, is_observation in split_segments(text) if is_observation]


# ----------------------------------------------------------------------------------------------
# RuleCritic


def test_rule_critic_turns_a_statement_into_cell_output_and_restated_line():
    rewritten = RuleCritic(FakeSandbox("61")).rewrite(["12 * 5 = 60.\n"])
    expected = f"{FENCE}python\nprint(12 * 5)\n{FENCE}\n{FENCE}output\n61\n{FENCE}\n12 * 5 = 61.\n"
    assert rewritten == [expected], f"got {rewritten!r}"


def test_rule_critic_leaves_other_lines_unchanged():
    box = FakeSandbox()
    chunk = "First we multiply.\nThe answer is \\boxed{60}."
    assert RuleCritic(box).rewrite([chunk]) == [chunk], "a chunk without statements must come back unchanged"
    assert box.batches == [], "no statement, no sandbox call"


def test_rule_critic_rewrites_only_statement_lines_of_a_mixed_chunk():
    chunk = "Now compute.\n3 * 4 = 12.\nso far so good\n"
    rewritten = RuleCritic(FakeSandbox("12")).rewrite([chunk])[0]
    assert rewritten.startswith("Now compute.\n") and rewritten.endswith("3 * 4 = 12.\nso far so good\n"), rewritten
    assert extract_cells(rewritten) == ["print(3 * 4)"], rewritten


def test_rule_critic_failed_cell_drops_only_that_chunk():
    chunks = ["2 * 3 = 6.\n", "7 / 0 = 1.\n", "4 - 1 = 3.\n"]
    rewritten = RuleCritic(FakeSandbox("9")).rewrite(chunks)
    assert rewritten[1] is None, "a failing cell must turn its chunk into None"
    assert rewritten[0].endswith("2 * 3 = 9.\n") and rewritten[2].endswith("4 - 1 = 9.\n"), rewritten


def test_rule_critic_sends_all_cells_of_all_chunks_in_one_batch():
    box = FakeSandbox()
    RuleCritic(box).rewrite(["2 * 3 = 6.\n5 + 1 = 6.\n", "gcd(4, 6) = 2.\n"])
    assert box.batches == [["print(2 * 3)", "print(5 + 1)", "import math\nprint(math.gcd(4, 6))"]], box.batches


def test_rule_critic_splices_real_outputs(sandbox):
    rewritten = RuleCritic(sandbox).rewrite(["1234 * 56 = 1.\n2^10 mod 1000 = 5.\n"])[0]
    assert output_blocks(rewritten) == ["69104", "24"], rewritten
    assert "1234 * 56 = 69104." in rewritten and "2^10 mod 1000 = 24." in rewritten, rewritten


# ----------------------------------------------------------------------------------------------
# A scripted actor: each call writes the next reference line of the attempt's problem


class ScriptedActor:
    """Stands in for the RolloutEngine as TIRGen's actor. It finds the problem from the prompt and the next
    reference line from the restated lines already in the response. Like a small model it slips on the
    arithmetic (every statement claims value + 1), so only the critic's REAL outputs make the text right;
    wrong_ids get a wrong final answer."""

    def __init__(self, tokenizer, problems, wrong_ids=()):
        self.tokenizer, self.problems, self.wrong_ids = tokenizer, problems, set(wrong_ids)
        self.requested: list[str] = []
        self.configs = []

    def generate(self, requests, config, *, seed=0, progress=None):
        self.configs.append(config)
        rollouts = []
        for index, request in enumerate(requests):
            text = self.tokenizer.decode(request.prompt_ids)
            problem = next(p for p in self.problems if f"Question: {p.question}\n" in text)
            self.requested.append(problem.id)
            done_lines = text.split("Answer:\n", 1)[1].split("\n")
            lines = problem.reference.split("\n")
            k = next((i for i, line in enumerate(lines) if line not in done_lines), len(lines) - 1)
            final = k == len(lines) - 1
            line = lines[k]
            if final and problem.id in self.wrong_ids:
                line = f"The answer is \\boxed{{{int(problem.answer) + 1}}}."
            statement = tasks.STATEMENT_RE.match(line)
            if statement:
                line = f"{statement['expression']} = {int(statement['value']) + 1}."
            rollouts.append(Rollout(request=index, sample=0, prompt_ids=list(request.prompt_ids),
                                    text=line if final else line + "\n", finish_reason="eos" if final else "stop"))
        return rollouts


class SpyCritic:
    def __init__(self, inner):
        self.inner, self.name, self.chunks = inner, inner.name, []

    def rewrite(self, chunks):
        self.chunks += chunks
        return self.inner.rewrite(chunks)


PROBLEMS = tasks.train_split(9)          # one per training template (1-cell and 2-cell problems)
WRONG = {PROBLEMS[1].id}
CONFIG = TIRGenConfig(attempts=2, step_tokens=48, step_delimiter="\n", code_filter="none", one_cell_keep=1.0)


@pytest.fixture(scope="module")
def tirgen_run(tmp_path_factory, tokenizer, sandbox):
    out = tmp_path_factory.mktemp("tirgen")
    actor, critic = ScriptedActor(tokenizer, PROBLEMS, WRONG), SpyCritic(RuleCritic(sandbox))
    stats = run_tirgen(out, actor, critic, PROBLEMS, CONFIG, "tiny", problems_per_round=4)
    records = [json.loads(line) for line in (out / "tirgen.jsonl").read_text().splitlines()]
    return out, actor, critic, stats, records


def test_every_output_block_is_what_its_cell_prints(tirgen_run):
    *_, records = tirgen_run
    assert records, "the run kept no samples"
    with Sandbox(workers=2, timeout=5.0) as fresh:
        for record in records:
            cells, outputs = extract_cells(record["response"]), output_blocks(record["response"])
            assert len(cells) == len(outputs) == record["n_cells"] > 0, f"cells/outputs mismatch in {record['id']}"
            rerun = fresh.run_batch(cells)
            assert all(r.passed for r in rerun), f"a kept cell fails when re-run: {record['id']}"
            assert [r.observation for r in rerun] == outputs, f"output blocks are not the real outputs: {record['id']}"


def test_kept_samples_are_the_correctly_answered_problems(tirgen_run):
    *_, stats, records = tirgen_run
    assert sorted(r["id"] for r in records) == sorted(p.id for p in PROBLEMS if p.id not in WRONG), \
        f"kept {[r['id'] for r in records]}"
    assert stats["kept_per_stage"]["correct_answer"] == 2 * (len(PROBLEMS) - 1), stats["kept_per_stage"]


def test_records_carry_problem_answer_and_source(tirgen_run):
    *_, records = tirgen_run
    by_id = {p.id: p for p in PROBLEMS}
    for record in records:
        problem = by_id[record["id"]]
        assert (record["problem"], record["answer"], record["source"]) == (problem.question, problem.answer,
                                                                           "rule-critic"), record


def test_responses_keep_the_actor_text_around_the_cells(tirgen_run):
    *_, records = tirgen_run
    by_id = {p.id: p for p in PROBLEMS}
    for record in records:
        restated = [line for line in record["response"].split("\n") if not line.startswith(FENCE)]
        for line in by_id[record["id"]].reference.split("\n"):
            assert line in restated, f"reference line {line!r} missing from {record['response']!r}"


def test_critic_never_sees_the_problem(tirgen_run):
    _, _, critic, _, _ = tirgen_run
    assert critic.chunks, "the critic was never called"
    for chunk in critic.chunks:
        assert "Question:" not in chunk and not any(p.question in chunk for p in PROBLEMS), \
            f"problem text reached the critic: {chunk!r}"


def test_actor_runs_without_tools(tirgen_run):
    _, actor, *_ = tirgen_run
    assert all(c.max_tool_calls == 0 and c.stop_strings == ("\n",) for c in actor.configs), actor.configs


def test_stats_file_has_stage_counts_and_cell_histogram(tirgen_run):
    out, _, _, stats, records = tirgen_run
    saved = json.loads((out / "tirgen_stats.json").read_text())
    assert saved["kept_per_stage"]["attempts"] == 2 * len(PROBLEMS), saved
    assert saved["kept_per_stage"]["balanced"] == len(records), saved
    histogram = {int(k): v for k, v in saved["cells_histogram"].items()}
    expected = {}
    for record in records:
        expected[record["n_cells"]] = expected.get(record["n_cells"], 0) + 1
    assert histogram == expected and set(histogram) == {1, 2}, f"cells histogram {histogram} != {expected}"


def test_second_run_does_not_call_the_actor_again(tirgen_run, tokenizer, sandbox):
    out, *_ = tirgen_run
    before = (out / "tirgen.jsonl").read_text()
    actor = ScriptedActor(tokenizer, PROBLEMS, WRONG)
    run_tirgen(out, actor, RuleCritic(sandbox), PROBLEMS, CONFIG, "tiny", problems_per_round=4)
    assert actor.requested == [], f"finished problems were generated again: {set(actor.requested)}"
    assert (out / "tirgen.jsonl").read_text() == before, "the rebuilt tirgen.jsonl differs"


def test_interrupted_run_resumes_with_only_the_missing_problems(tmp_path, tokenizer, sandbox):
    first = ScriptedActor(tokenizer, PROBLEMS)
    run_tirgen(tmp_path, first, RuleCritic(sandbox), PROBLEMS[:3], CONFIG, "tiny", problems_per_round=4)
    second = ScriptedActor(tokenizer, PROBLEMS)
    stats = run_tirgen(tmp_path, second, RuleCritic(sandbox), PROBLEMS[:5], CONFIG, "tiny", problems_per_round=4)
    assert set(second.requested) == {p.id for p in PROBLEMS[3:5]}, f"re-generated {set(second.requested)}"
    assert stats["kept_per_stage"]["attempts"] == 2 * 5, stats["kept_per_stage"]


def test_a_round_cut_by_a_kill_mid_write_is_redone(tmp_path, tokenizer, sandbox):
    run_tirgen(tmp_path, ScriptedActor(tokenizer, PROBLEMS), RuleCritic(sandbox), PROBLEMS[:3], CONFIG, "tiny")
    raw = tmp_path / "tirgen_raw.jsonl"
    partial = json.dumps({"problem_id": PROBLEMS[3].id, "response": "x", "dropped": "", "done": True})
    raw.write_text(raw.read_text() + partial + "\n" + partial[:25])   # 1 of 2 attempts, then a torn line
    actor = ScriptedActor(tokenizer, PROBLEMS)
    stats = run_tirgen(tmp_path, actor, RuleCritic(sandbox), PROBLEMS[:4], CONFIG, "tiny")
    assert set(actor.requested) == {PROBLEMS[3].id}, f"re-generated {set(actor.requested)}"
    assert stats["kept_per_stage"]["attempts"] == 2 * 4, stats["kept_per_stage"]
    ids = [json.loads(line)["problem_id"] for line in raw.read_text().splitlines()]
    assert sorted(ids) == sorted(p.id for p in PROBLEMS[:4] for _ in range(2)), f"raw file not repaired: {ids}"


def test_a_side_by_side_run_cut_short_resumes_to_what_one_process_writes(tmp_path, tokenizer, sandbox):
    config = replace(CONFIG, one_cell_keep=0.5)     # the balance filter draws once per attempt, in problem order
    run_tirgen(tmp_path / "alone", ScriptedActor(tokenizer, PROBLEMS, WRONG), RuleCritic(sandbox), PROBLEMS, config,
               "tiny", problems_per_round=4)
    shared = tmp_path / "shared"
    shared.mkdir()
    rounds = split_rounds(PROBLEMS, 4)               # 3 rounds: share 0 = rounds[:1], share 1 = rounds[1:]
    generate_rounds(part_path(shared, 1), ScriptedActor(tokenizer, PROBLEMS, WRONG), RuleCritic(sandbox), rounds[1:],
                    config, "tiny", progress=lambda done: None)   # share 1 finished; share 0 was killed first
    actor = ScriptedActor(tokenizer, PROBLEMS, WRONG)
    run_tirgen(shared, actor, RuleCritic(sandbox), PROBLEMS, config, "tiny", problems_per_round=4)
    assert set(actor.requested) == {p.id for p in rounds[0]}, f"only share 0 is redone: {set(actor.requested)}"
    assert not list(shared.glob("tirgen_raw.part-*")), "a folded part file must be removed"
    for name in ("tirgen.jsonl", "tirgen_stats.json"):
        assert (shared / name).read_text() == (tmp_path / "alone" / name).read_text(), \
            f"{name}: rounds that finished out of order must give what one process writes"


# ----------------------------------------------------------------------------------------------
# generate_attempts: why attempts end


class FixedActor:
    """Every call answers every request with the same rollout text / finish reason."""

    def __init__(self, any_tokenizer, text, finish_reason="stop"):
        self.tokenizer, self.text, self.finish_reason = any_tokenizer, text, finish_reason

    def generate(self, requests, config, *, seed=0, progress=None):
        return [Rollout(request=i, sample=0, prompt_ids=list(r.prompt_ids), text=self.text,
                        finish_reason=self.finish_reason) for i, r in enumerate(requests)]


def attempt_with(any_tokenizer, text, critic, finish_reason="stop", **config):
    settings = dict(attempts=1, step_delimiter="\n", max_chunks=3)
    settings.update(config)
    return generate_attempts(FixedActor(any_tokenizer, text, finish_reason), critic, PROBLEMS[:1],
                             TIRGenConfig(**settings), "tiny")[0]


def test_attempt_with_a_fence_from_the_actor_is_dropped(any_tokenizer):
    attempt = attempt_with(any_tokenizer, f"{FENCE}python\nprint(1)\n{FENCE}\n", RuleCritic(FakeSandbox()))
    assert attempt.dropped == "actor wrote a fence", attempt


def test_attempt_with_a_failed_critic_cell_is_dropped(any_tokenizer):
    attempt = attempt_with(any_tokenizer, "8 / 0 = 1.\n", RuleCritic(FakeSandbox()))
    assert attempt.dropped == "critic cell failed", attempt


def test_attempt_that_never_answers_is_dropped(any_tokenizer):
    attempt = attempt_with(any_tokenizer, "Let me think.\n", RuleCritic(FakeSandbox()))
    assert attempt.dropped == "too many chunks" and attempt.response == "Let me think.\n" * 3, attempt


def test_empty_chunk_ends_the_attempt(any_tokenizer):
    attempt = attempt_with(any_tokenizer, "", RuleCritic(FakeSandbox()))
    assert attempt.dropped == "empty chunk", attempt


def test_overlong_attempt_is_dropped(any_tokenizer):
    attempt = attempt_with(any_tokenizer, "Let me think.\n", RuleCritic(FakeSandbox()), max_response_tokens=4)
    assert attempt.dropped == "too long", attempt


def test_chunk_cut_by_the_token_limit_goes_back_to_its_last_newline(tokenizer):
    critic = SpyCritic(RuleCritic(FakeSandbox()))
    attempt_with(tokenizer, "Let me think.\nhalf a sen", critic, finish_reason="length", max_chunks=1)
    assert critic.chunks == ["Let me think.\n"], critic.chunks


class RecordingActor(FixedActor):
    """A FixedActor that keeps the decoded prompt of every request it was given."""

    def __init__(self, tokenizer, text):
        super().__init__(tokenizer, text)
        self.contexts = []

    def generate(self, requests, config, *, seed=0, progress=None):
        self.contexts += [self.tokenizer.decode(r.prompt_ids) for r in requests]
        return super().generate(requests, config, seed=seed, progress=progress)


@pytest.mark.parametrize("sees_cells", [True, False])
def test_actor_reads_its_text_with_or_without_the_cells(tokenizer, sees_cells):
    actor = RecordingActor(tokenizer, "12 * 5 = 50.\n")
    generate_attempts(actor, RuleCritic(FakeSandbox("60")), PROBLEMS[:1],
                      TIRGenConfig(attempts=1, step_delimiter="\n", max_chunks=2, actor_sees_cells=sees_cells), "tiny")
    second = actor.contexts[1]
    assert second.endswith("12 * 5 = 60.\n"), f"the actor continues after the restated real value: {second!r}"
    assert (FENCE in second) == sees_cells, f"cells {'shown' if sees_cells else 'elided'} expected: {second!r}"


def test_eos_finishes_the_attempt(tokenizer):
    attempt = attempt_with(tokenizer, "No boxed answer here.", RuleCritic(FakeSandbox()), finish_reason="eos")
    assert attempt.done and not attempt.dropped and attempt.response == "No boxed answer here.", attempt


# ----------------------------------------------------------------------------------------------
# Filter rules


@pytest.mark.parametrize("code", [
    "import math\nprint(math.gcd(4, 6))", "print(abs(-3))", "for i in range(3):\n    print(i)",
    "i = 0\nwhile i < 2:\n    i += 1\nprint(i)", "x = 3\nif x > 2:\n    print(x)", "print([k * k for k in (1, 2)])",
])
def test_nontrivial_cells(code):
    assert cell_is_nontrivial(code), f"should count as non-trivial: {code!r}"


@pytest.mark.parametrize("code", ["print(3 * 4)", "x = 5\nprint(x + 1)", "print((", ""])
def test_trivial_or_broken_cells(code):
    assert not cell_is_nontrivial(code), f"should count as trivial (or unparsable): {code!r}"


TRIVIAL = cell("print(3 * 4)", "12")
LIBRARY = cell("import math\nprint(math.gcd(4, 6))", "2")
LONG = cell("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\nprint(a + b + c + d + e)", "15")


def response(*cells_, answer="12"):
    return "Work.\n" + "".join(cells_) + f"The answer is \\boxed{{{answer}}}."


def test_code_quality_library_rule():
    assert not code_quality_ok(response(TRIVIAL, TRIVIAL), TIRGenConfig(code_filter="library")), "trivial cells pass"
    assert code_quality_ok(response(LIBRARY, TRIVIAL), TIRGenConfig(code_filter="library")), "half non-trivial fails"


def test_code_quality_lines_rule():
    config = TIRGenConfig(code_filter="lines", min_code_lines=5)
    assert code_quality_ok(response(LONG), config), "a 6-line cell should pass the > 5 lines rule"
    assert not code_quality_ok(response(LIBRARY), config), "a 2-line cell should fail the > 5 lines rule"


def test_code_quality_none_rule_accepts_trivial_cells():
    assert code_quality_ok(response(TRIVIAL), TIRGenConfig(code_filter="none")), "filter none must accept any cell"


def test_code_quality_needs_at_least_one_cell():
    assert not code_quality_ok("The answer is \\boxed{1}.", TIRGenConfig(code_filter="none")), "no cell accepted"


def test_code_quality_needs_an_output_for_every_block():
    text = f"Work.\n{FENCE}python\nprint(3 * 4)\n{FENCE}\n" + LIBRARY + "The answer is \\boxed{12}."
    assert not code_quality_ok(text, TIRGenConfig(code_filter="none")), "a block without its output passed"


def test_code_quality_unknown_rule_raises():
    with pytest.raises(ValueError, match="unknown code filter"):
        code_quality_ok(response(TRIVIAL), TIRGenConfig(code_filter="ast"))


def test_repetition():
    line = "We check the product again.\n"
    assert is_repetitive(line * 3 + "The answer is \\boxed{1}."), "three identical lines should be repetitive"
    assert not is_repetitive(line * 2 + "The answer is \\boxed{1}."), "two identical lines are fine"


def test_repetition_counts_whole_cells_not_their_lines():
    imports = (cell("import math\nprint(math.gcd(4, 6))", "2") + cell("import math\nprint(math.lcm(4, 6))", "12")
               + cell("import math\nprint(math.isqrt(99))", "9"))
    assert not is_repetitive(imports + "The answer is \\boxed{9}."), "stateless cells each importing math flagged"


def test_repetition_catches_the_same_cell_written_again_and_again():
    assert is_repetitive(TRIVIAL * 3 + "The answer is \\boxed{12}."), "a cell repeated three times is a loop"


def test_repetition_ignores_outputs_and_short_lines():
    text = "".join(cell(f"print({k})", "same output line") for k in range(4)) + "ok\nok\nok\nThe answer is \\boxed{1}."
    assert not is_repetitive(text), "repeated outputs or short lines should not count"


def test_format_ok():
    assert format_ok(response(TRIVIAL)), "a well-formed response failed the format check"
    assert not format_ok(f"Work.\n{FENCE}python\nprint(1)\nThe answer is \\boxed{{1}}."), "unclosed fence accepted"
    assert not format_ok("Work.\n" + TRIVIAL + "The answer is 12."), "missing boxed answer accepted"


# ----------------------------------------------------------------------------------------------
# filter_attempts on a crafted set


def problem(pid, answer):
    return Problem(id=pid, question=f"question {pid}", answer=answer, kind=f"kind-{pid}")


CRAFTED_PROBLEMS = {p.id: p for p in [problem("A", "12"), problem("B", "12"), problem("C", "12"), problem("D", "12"),
                                      problem("E", "12"), problem("F", "12"), problem("G", "12")]}
UNOUTPUT = f"{FENCE}python\nprint(3 * 4)\n{FENCE}\n"
CRAFTED = [
    Attempt("A", response(TRIVIAL, TRIVIAL), done=True),                      # two cells, correct
    Attempt("A", response(LIBRARY, TRIVIAL, LONG), done=True),                # second correct attempt of A
    Attempt("B", response(TRIVIAL), done=True),                               # one cell, correct
    Attempt("C", response(TRIVIAL, answer="13"), done=True),                  # wrong answer
    Attempt("D", response(TRIVIAL), dropped="critic cell failed", done=True),
    Attempt("E", "Work.\n" + TRIVIAL + "The answer is 12.", done=True),        # no boxed answer
    Attempt("F", response(UNOUTPUT, TRIVIAL), done=True),                     # a block without its output
    Attempt("G", "We check the product again.\n" * 3 + response(TRIVIAL), done=True),   # repetitive
]


def test_filter_counts_each_stage_exactly():
    _, stats = filter_attempts(CRAFTED, CRAFTED_PROBLEMS, TIRGenConfig(code_filter="none", one_cell_keep=0.0))
    assert stats["kept_per_stage"] == {"attempts": 8, "completed": 7, "format": 6, "correct_answer": 5,
                                       "code_quality": 4, "not_repetitive": 3, "not_solved_by_cot": 3,
                                       "one_per_problem": 2, "balanced": 1}, stats["kept_per_stage"]


def test_filter_stage_counts_never_increase():
    _, stats = filter_attempts(CRAFTED, CRAFTED_PROBLEMS, TIRGenConfig(code_filter="library", one_cell_keep=0.5))
    counts = list(stats["kept_per_stage"].values())
    assert all(a >= b for a, b in zip(counts, counts[1:])), stats["kept_per_stage"]


def test_filter_keeps_one_sample_per_problem_and_drops_one_cell_bucket():
    records, stats = filter_attempts(CRAFTED, CRAFTED_PROBLEMS, TIRGenConfig(code_filter="none", one_cell_keep=0.0))
    assert [(r["id"], r["n_cells"]) for r in records] == [("A", 2)], records
    assert stats["cells_histogram"] == {2: 1} and stats["dropped_attempts"] == {"critic cell failed": 1}, stats


def test_filter_keeps_the_one_cell_bucket_when_asked():
    records, _ = filter_attempts(CRAFTED, CRAFTED_PROBLEMS, TIRGenConfig(code_filter="none", one_cell_keep=1.0))
    assert sorted(r["id"] for r in records) == ["A", "B"], records


def test_filter_drops_problems_solved_by_plain_cot():
    records, stats = filter_attempts(CRAFTED, CRAFTED_PROBLEMS, TIRGenConfig(code_filter="none", one_cell_keep=1.0),
                                     cot_solved={"A"})
    assert [r["id"] for r in records] == ["B"], records
    assert stats["kept_per_stage"]["not_solved_by_cot"] == 1, stats["kept_per_stage"]


# ----------------------------------------------------------------------------------------------
# LLMCritic


@pytest.fixture(scope="module")
def llm_engine(tokenizer, sandbox):
    model = tiny.build_model(tokenizer, SIZE, seed=0).eval()
    return RolloutEngine(model, tokenizer, sandbox)


def test_llm_critic_prompt_holds_the_chunk_and_the_worked_example(llm_engine):
    chunk = "The box holds 17 * 23 = 391 pens.\n"
    prompt = LLMCritic(llm_engine).prompt(chunk)
    assert chunk in prompt and "Example step:" in prompt and CRITIC_INSTRUCTIONS in prompt, prompt


def test_llm_critic_prompt_varies_only_by_the_chunk(llm_engine):
    critic = LLMCritic(llm_engine)
    a, b = "Chunk number one with 4 * 5 = 20.", "A different step: gcd(8, 12) = 4."
    assert critic.prompt(a).replace(a, b) == critic.prompt(b), "the prompt carries something besides the chunk"


def test_llm_critic_has_a_name_even_for_an_unnamed_model(llm_engine):
    assert LLMCritic(llm_engine).name, "the critic name (the records' source) must not be empty"


class CannedEngine:
    """An engine stand-in returning prepared critic rollouts."""

    def __init__(self, tokenizer, rollouts):
        self.tokenizer, self.rollouts, self.model = tokenizer, rollouts, type("M", (), {"config": object()})()

    def generate(self, requests, config, *, seed=0, progress=None):
        assert len(requests) == len(self.rollouts)
        return self.rollouts


def canned(text, finish_reason="eos", passed=True):
    cells = [Cell(code="print(1)", passed=passed, executed=True, observation="1", fence_token=0, close_token=1,
                  output_end=2)]
    return Rollout(request=0, sample=0, prompt_ids=[], text=text, finish_reason=finish_reason, cells=cells)


def test_llm_critic_maps_rollouts_to_rewrites(tokenizer):
    rollouts = [canned("\nrewritten step\n\n"), canned("x", passed=False), canned("x", finish_reason="budget"),
                canned("cut off mid", finish_reason="length")]
    chunks = ["step one\n\n", "step two\n", "step three\n", "step four\n"]
    rewritten = LLMCritic(CannedEngine(tokenizer, rollouts)).rewrite(chunks)
    assert rewritten == ["rewritten step\n\n", None, None, None], rewritten


def test_llm_critic_rewrites_end_to_end_with_a_tiny_model(llm_engine):
    critic = LLMCritic(llm_engine, max_new_tokens=12, temperature=1.0)
    rewritten = critic.rewrite(["12 * 5 = 60.\n", "So the total is 60.\n"])
    assert len(rewritten) == 2 and all(r is None or isinstance(r, str) for r in rewritten), rewritten


def test_llm_critic_returns_text_when_the_critic_finishes(tokenizer, sandbox):
    """A tiny model whose head always says EOS: the critic's rollout ends cleanly, so the rewrite is a str."""
    model = tiny.build_model(tokenizer, SIZE, seed=0).eval()
    head = torch.nn.Linear(SIZE.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    rewritten = LLMCritic(RolloutEngine(model, tokenizer, sandbox), max_new_tokens=8).rewrite(["12 * 5 = 60.\n\n"])
    assert rewritten == ["\n\n"], f"an empty clean rewrite keeps the chunk's delimiter: {rewritten!r}"


def test_the_code_filter_defaults_to_the_released_code_rule():
    from thor_min.config import preset_for

    defaults = {"TIRGenConfig": TIRGenConfig().code_filter, "qwen-1.5b preset": preset_for("qwen-1.5b").tirgen_code_filter,
                "qwen3-8b preset": preset_for("qwen3-8b").tirgen_code_filter}
    assert set(defaults.values()) == {"lines"}, \
        f"THOR.md: where paper and code differ the code's rule (> 5 lines) is the default, got {defaults}"
