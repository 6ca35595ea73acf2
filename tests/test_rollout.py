"""The rollout engine: exact decoding, exact log-probs and masks, cells, self-correction and the stopping modes.

Two kinds of models: tiny random Qwen2/Qwen3 models (greedy equivalence with `model.generate`), and a tiny model
trained in a few seconds to reproduce a handful of tool-using answers, so that greedy decoding deterministically
writes python cells. Scripted sandboxes (`run_batch(codes) -> [ExecResult]`) make cells fail on cue.

The strong check used throughout (`assert_logprobs_match_fresh_forward`): every sampled token's recorded log-prob
equals log_softmax of a fresh full forward over prompt + final completion. It holds only if the cache, the
positions, the observation tokens and every rolled-back (masked) column are exactly right.
"""

import threading

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from conftest import fit_texts_exact, tokenizer_named, TOKENIZERS
from thor_min import rollout as rollout_module
from thor_min.kvcache import RolloutCache
from thor_min.rollout import RolloutEngine, RolloutRequest, SamplingConfig, sample_tokens
from thor_min.sandbox import ExecResult, Sandbox
from thor_min.trajectory import observation_block

ANSWERS = {
    "A": "```python\nprint(2 + 3)\n```\n```output\n5\n```\nSo \\boxed{5}.",
    "B": "```python\nprint(1 / 0)\n```\n```output\nZeroDivisionError: division by zero\n```\nSo \\boxed{0}.",
    "C": "First multiply.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n"
         "Then add one.\n```python\nprint(42 + 1)\n```\n```output\n43\n```\nSo \\boxed{43}.",
    # D is long enough to keep decoding for several steps while A's cell runs, with every tokenizer
    "D": "No code is needed: the week has seven days, and one week is asked for, so \\boxed{7}.",
}
OUTPUTS = {"print(2 + 3)": "5", "print(6 * 7)": "42", "print(42 + 1)": "43"}
GREEDY = dict(temperature=0.0, max_new_tokens=80)


def prompt_text(name: str) -> str:
    return f"Question: {name}\nAnswer:\n"


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    """Every test here runs with the tiny, the Qwen2.5 (pad == eos) and the Qwen3 tokenizer."""
    return tokenizer_named(request.param)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Tokenizer-independent exactness checks run once, with the tiny tokenizer."""
    return tokenizer_named("tiny")


@pytest.fixture(scope="module")
def tool_model(tokenizer):
    """A 2-layer model that reproduces ANSWERS (it writes the cells of A, B, C and answers D without code)."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    loss = fit_texts_exact(model, tokenizer, [prompt_text(k) + v for k, v in ANSWERS.items()], steps=300, lr=1e-2)
    assert loss < 0.1, f"the tool model did not learn its answers (loss {loss:.3f})"
    return model


def requests_for(tokenizer, names, samples=1, prefix=""):
    return [RolloutRequest(tokenizer.encode(prompt_text(n) + prefix), samples) for n in names]


def exec_result(passed: bool, observation: str) -> ExecResult:
    return ExecResult(passed=passed, stdout=observation if passed else "", stderr="", timed_out=False, seconds=0.0,
                      observation=observation, error="" if passed else observation)


class ScriptedSandbox:
    """A sandbox whose n-th executed cell (0-based, over all calls) fails iff n is in `fail`, or always."""

    def __init__(self, fail=(), always_fail=False, gate=None, gate_timeout=10.0):
        self.fail, self.always_fail, self.codes = set(fail), always_fail, []
        self.gate, self.gate_timeout, self.running = gate, gate_timeout, threading.Event()

    def run_batch(self, codes):
        self.running.set()
        if self.gate is not None:
            self.gate.wait(self.gate_timeout)
        results = []
        for code in codes:
            failed = self.always_fail or len(self.codes) in self.fail
            results.append(exec_result(not failed, f"Boom{len(self.codes)}" if failed else OUTPUTS.get(code, "ok")))
            self.codes.append(code)
        self.running.clear()
        return results


def assert_logprobs_match_fresh_forward(model, rollout, temperature: float = 1.0, atol: float = 1e-4) -> None:
    """Recorded log-probs of sampled tokens == log_softmax(fresh forward / T); forced tokens record 0."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(rollout.prompt_ids) - 1:-1].float()
    scale = temperature if temperature > 0 else 1.0
    fresh = torch.log_softmax(logits / scale, -1).gather(-1, ids[0, len(rollout.prompt_ids):, None]).squeeze(-1)
    recorded, mask = torch.tensor(rollout.logprobs), torch.tensor(rollout.loss_mask, dtype=torch.bool)
    assert len(recorded) == len(mask) == len(rollout.completion_ids), "one log-prob and mask entry per token"
    error = (recorded[mask] - fresh[mask]).abs().max().item() if mask.any() else 0.0
    assert error < atol, f"sampled log-probs differ from a fresh forward by {error:.2e} ({rollout.finish_reason})"
    assert (recorded[~mask] == 0).all(), "forced (observation) tokens must record log-prob 0"


# ----------------------------------------------------------------------------------------------
# Exactness


def random_model(kind, tokenizer):
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(1)
    return model_class(config).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_greedy_matches_model_generate_with_groups_and_early_finishers(kind, tiny_tokenizer, monkeypatch):
    model = random_model(kind, tiny_tokenizer)
    texts = ["Question: 1+1", "Q", "Question: what is 7 times 8 plus 3, then squared?", "abc def"]
    requests = [RolloutRequest(tiny_tokenizer.encode(t), samples=3) for t in texts]           # 12 rows
    probe = RolloutEngine(model, tiny_tokenizer).generate(requests[:4], SamplingConfig(ignore_eos=True, max_tool_calls=0,
                                                                                   **GREEDY))
    # make a token of each prompt's greedy text an EOS, so the groups finish at different steps
    stop_ids = [probe[3 * i].completion_ids[step] for i, step in enumerate((3, 9, 15, 30))]
    model.generation_config.eos_token_id = stop_ids
    compactions = []
    original_select = RolloutCache.select_rows
    monkeypatch.setattr(RolloutCache, "select_rows",
                        lambda self, rows: (compactions.append(len(rows)), original_select(self, rows))[1])
    rollouts = RolloutEngine(model, tiny_tokenizer).generate(requests, SamplingConfig(max_tool_calls=0, **GREEDY))
    assert compactions, "finished rows were never dropped: the compaction path did not run"
    assert len({len(r.completion_ids) for r in rollouts}) > 2, "rows must finish at different steps"
    for index, text in enumerate(texts):
        prompt = torch.tensor([tiny_tokenizer.encode(text)])
        expected = model.generate(prompt, do_sample=False, max_new_tokens=GREEDY["max_new_tokens"],
                                  pad_token_id=tiny_tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
        for rollout in rollouts[3 * index:3 * index + 3]:
            got = rollout.completion_ids
            assert got == expected[:len(got)], f"prompt {index} sample {rollout.sample}: differs from generate()"
            assert rollout.finish_reason == "eos" and got[-1] in stop_ids or len(got) == GREEDY["max_new_tokens"]


def test_logits_after_a_tool_injection_equal_a_fresh_forward(tool_model, tokenizer, monkeypatch):
    seen = []

    def recording_sample_tokens(logits, config, generator=None, **kwargs):
        seen.append(logits[0].clone())
        return sample_tokens(logits, config, generator, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_tokens", recording_sample_tokens)
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox())
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(**GREEDY))
    assert len(rollout.executed_cells) == 2, "the tool model should run both cells of answer C"
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        fresh = tool_model(input_ids=ids).logits[0, len(rollout.prompt_ids) - 1:-1]
    sampled_positions = [i for i, m in enumerate(rollout.loss_mask) if m]
    assert len(seen) == len(sampled_positions)
    for position, logits in zip(sampled_positions, seen):
        error = (logits - fresh[position]).abs().max().item()
        assert error < 1e-4, f"logits for completion token {position} differ from a fresh forward by {error:.2e}"
    after_observation = [c.output_end for c in rollout.cells]
    assert set(after_observation) <= set(sampled_positions), "the token after each observation was sampled"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_fresh_forward_with_tools_groups_and_compaction(tool_model, tokenizer, temperature):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(fail=(0, 3)))
    config = SamplingConfig(temperature=temperature, max_new_tokens=60, self_correct=1, backtrack_tokens=3)
    rollouts = engine.generate(requests_for(tokenizer, "ABCD", samples=3), config, seed=3)
    assert sum(r.retries for r in rollouts) >= 1 and sum(len(r.executed_cells) for r in rollouts) >= 4
    for rollout in rollouts:
        assert_logprobs_match_fresh_forward(tool_model, rollout, temperature)


def test_masks_are_exactly_the_observation_blocks(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox())
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(**GREEDY))
    assert rollout.finish_reason == "eos"
    ids, mask = rollout.completion_ids[:-1], rollout.loss_mask[:-1]          # the text excludes the EOS
    spans, start = [], 0                                                    # maximal runs of equal mask values
    for end in range(1, len(mask) + 1):
        if end == len(mask) or mask[end] != mask[start]:
            spans.append((tokenizer.decode(ids[start:end]), mask[start] == 0))
            start = end
    assert "".join(text for text, _ in spans) == rollout.text
    written = [text for text, forced in spans if not forced]
    forced = [text for text, forced in spans if forced]
    expected = [observation_block(c.observation, tokenizer.decode(ids[:c.close_token])) for c in rollout.cells]
    assert forced == expected == ["```output\n42\n```\n", "```output\n43\n```\n"], \
        "mask-0 spans must be exactly the observation blocks"
    assert written == ["First multiply.\n```python\nprint(6 * 7)\n```\n", "Then add one.\n```python\nprint(42 + 1)\n```\n",
                       "So \\boxed{43}."], "mask-1 spans must be exactly the model-written text"


def test_cells_record_code_pass_flag_and_token_spans(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(fail=(1,)))
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(**GREEDY))
    ids = rollout.completion_ids
    assert [(c.code, c.passed, c.executed) for c in rollout.cells] == [("print(6 * 7)", True, True),
                                                                      ("print(42 + 1)", False, True)]
    for cell in rollout.cells:
        assert "```python" not in tokenizer.decode(ids[:cell.fence_token])[-12:], "fence_token starts the fence"
        assert tokenizer.decode(ids[cell.fence_token:cell.close_token]).lstrip().startswith("```python\n")
        before_close = tokenizer.decode(ids[:cell.close_token])
        assert before_close.rstrip("\n").endswith("```") and cell.code in before_close
        block = observation_block(cell.observation, before_close)
        assert tokenizer.decode(ids[cell.close_token:cell.output_end]) == block, "observation tokens follow the close"
        assert set(rollout.loss_mask[cell.close_token:cell.output_end]) == {0}
    assert rollout.cells[1].observation == "Boom1" and rollout.failed_cell is rollout.cells[1]


# ----------------------------------------------------------------------------------------------
# Self-correction


def discarded(rollout) -> int:
    return rollout.sampled_tokens - sum(rollout.loss_mask)


def test_a_failed_cell_is_rolled_back_and_resampled(tool_model, tokenizer):
    sandbox = ScriptedSandbox(fail=(0,))                      # the first execution fails, the retry passes
    engine = RolloutEngine(tool_model, tokenizer, sandbox)
    rollout, = engine.generate(requests_for(tokenizer, ["A"]), SamplingConfig(self_correct=1, **GREEDY))
    assert rollout.retries == 1 and sandbox.codes == ["print(2 + 3)"] * 2
    assert "Boom0" not in rollout.text, "the failed block and its error must be gone from the final text"
    assert rollout.text == ANSWERS["A"] and [c.passed for c in rollout.cells] == [True]
    assert discarded(rollout) == rollout.cells[0].close_token, "all tokens up to the failed close were resampled"
    assert_logprobs_match_fresh_forward(tool_model, rollout)


def test_backtrack_tokens_sets_how_far_the_rollback_goes(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(fail=(0,)))
    config = SamplingConfig(self_correct=1, backtrack_tokens=2, **GREEDY)
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), config)
    cell = rollout.cells[0]
    assert rollout.retries == 1 and cell.passed
    assert discarded(rollout) == cell.close_token - (cell.fence_token - 2), \
        "a rollback keeps everything before fence_token - backtrack_tokens"
    assert_logprobs_match_fresh_forward(tool_model, rollout)


def test_rollback_never_cuts_into_an_earlier_observation(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(fail=(1,)))  # the second cell fails once
    config = SamplingConfig(self_correct=1, backtrack_tokens=500, **GREEDY)
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), config)
    first, second = rollout.cells
    assert rollout.retries == 1 and first.passed and second.passed
    assert discarded(rollout) == second.close_token - first.output_end, "the rollback stops at the observation"
    assert rollout.text == ANSWERS["C"]
    assert_logprobs_match_fresh_forward(tool_model, rollout)


def test_retries_are_capped_then_the_failure_is_kept(tool_model, tokenizer):
    sandbox = ScriptedSandbox(always_fail=True)
    engine = RolloutEngine(tool_model, tokenizer, sandbox)
    rollout, = engine.generate(requests_for(tokenizer, ["A"]), SamplingConfig(self_correct=2, **GREEDY))
    assert rollout.retries == 2 and len(sandbox.codes) == 3, "2 retries = 3 executions of the failing cell"
    assert rollout.failed_cell is not None and "```output\nBoom2\n```" in rollout.text
    assert_logprobs_match_fresh_forward(tool_model, rollout)


# ----------------------------------------------------------------------------------------------
# Modes and stopping


def test_stop_at_first_failure_ends_the_row(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(always_fail=True))
    config = SamplingConfig(stop_at_first_failure=True, self_correct=3, **GREEDY)
    rollout, = engine.generate(requests_for(tokenizer, ["A"]), config)
    assert rollout.finish_reason == "cell_error" and rollout.retries == 0
    assert rollout.text.rstrip("\n").endswith("```") and "```output" not in rollout.text
    assert set(rollout.loss_mask) == {1}


@pytest.mark.parametrize("failing", [False, True])
def test_stop_after_first_cell_reports_the_pass_flag_without_an_observation(tool_model, tokenizer, failing):
    sandbox = ScriptedSandbox(always_fail=failing)
    engine = RolloutEngine(tool_model, tokenizer, sandbox)
    config = SamplingConfig(stop_after_first_cell=True, max_tool_calls=0, **GREEDY)
    rollout, = engine.generate(requests_for(tokenizer, ["C"], prefix="First multiply.\n"), config)
    assert rollout.finish_reason == "cell" and len(sandbox.codes) == 1
    assert [(c.code, c.passed, c.executed) for c in rollout.cells] == [("print(6 * 7)", not failing, True)]
    assert "```output" not in rollout.text and set(rollout.loss_mask) == {1}, "no observation is appended"


def test_tool_budget_ends_the_row(tool_model, tokenizer):
    sandbox = ScriptedSandbox()
    engine = RolloutEngine(tool_model, tokenizer, sandbox)
    rollout, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(max_tool_calls=1, **GREEDY))
    assert rollout.finish_reason == "budget" and len(sandbox.codes) == 1
    assert [c.executed for c in rollout.cells] == [True, False], "the cell over budget is recorded, not run"


def test_no_tools_means_no_execution(tool_model, tokenizer):
    rollout, = RolloutEngine(tool_model, tokenizer).generate(requests_for(tokenizer, ["A"]),
                                                             SamplingConfig(max_tool_calls=0, **GREEDY))
    assert rollout.cells == [] and set(rollout.loss_mask) == {1}
    assert rollout.text.startswith("```python\nprint(2 + 3)\n```"), "the model still writes its code"


def test_a_sandbox_is_required_when_tools_are_on(tool_model, tokenizer):
    with pytest.raises(ValueError, match="sandbox"):
        RolloutEngine(tool_model, tokenizer).generate(requests_for(tokenizer, ["A"]), SamplingConfig(**GREEDY))


def test_stop_strings_and_length(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox())
    stop, = engine.generate(requests_for(tokenizer, ["D"]), SamplingConfig(max_tool_calls=0, stop_strings=("so",),
                                                                            **GREEDY))
    assert stop.finish_reason == "stop" and stop.text.endswith("so")
    limit, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(temperature=0, max_new_tokens=5))
    assert limit.finish_reason == "length" and len(limit.completion_ids) == 5
    straddling = ("output", "```\nSo")        # inside the observation / across its end and the model's "So"
    observed, = engine.generate(requests_for(tokenizer, ["A"]), SamplingConfig(stop_strings=straddling, **GREEDY))
    assert observed.finish_reason == "eos", "only model-written text can match a stop string, never an observation"


def test_top_k_and_top_p_only_return_tokens_inside_the_kept_set():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    for config, allowed in ((SamplingConfig(top_k=2), {0, 1}), (SamplingConfig(top_p=0.75), {0, 1, 2}),
                            (SamplingConfig(top_k=4, top_p=0.5), {0, 1}), (SamplingConfig(top_p=0.0), {0})):
        tokens, logprobs = sample_tokens(logits, config, generator)
        assert set(tokens.tolist()) == allowed, f"{config.top_k=} {config.top_p=}: sampled {set(tokens.tolist())}"
        assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6), "log-probs are of the untruncated policy"


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    tokens, _ = sample_tokens(probs.log().repeat(20000, 1), SamplingConfig(), torch.Generator().manual_seed(1))
    frequencies = torch.bincount(tokens, minlength=3) / len(tokens)
    assert torch.allclose(frequencies, probs, atol=0.02), f"frequencies {frequencies.tolist()}"


def test_temperature_zero_is_greedy_and_seed_independent(tool_model, tokenizer):
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 1.0, 0.0]])
    assert sample_tokens(logits, SamplingConfig(temperature=0), None)[0].tolist() == [1, 0]
    engine = RolloutEngine(tool_model, tokenizer)
    config = SamplingConfig(max_tool_calls=0, **GREEDY)
    runs = [engine.generate(requests_for(tokenizer, "CD"), config, seed=seed) for seed in (0, 1)]
    assert [r.completion_ids for r in runs[0]] == [r.completion_ids for r in runs[1]]


def sample_runs(tool_model, tokenizer, batch_sizes, temperature=1.5):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox())
    return [engine.generate(requests_for(tokenizer, "ABCD", samples=2),
                            SamplingConfig(temperature=temperature, max_new_tokens=40, batch_size=size), seed=7)
            for size in batch_sizes]


def test_sampling_is_reproducible_for_a_given_batch_size(tool_model, tokenizer):
    runs = sample_runs(tool_model, tokenizer, (8, 8, 2))
    assert [r.completion_ids for r in runs[0]] == [r.completion_ids for r in runs[1]], \
        "the same seed and batch size must give the same rollouts"
    assert [r.request for r in runs[2]] == [0, 0, 1, 1, 2, 2, 3, 3], "request indices are global across batches"


def test_the_batch_size_moves_a_sample_only_across_a_cdf_boundary(tool_model, tokenizer):
    """The claim that holds for real vocabularies: each row draws its uniforms from its own stream, so another
    batch size changes its logits only by float noise; a token then changes only when the row's uniform lies
    within that noise of a CDF boundary, i.e. to the NEIGHBOURING token id (every token has probability > 0).
    With the tiny vocabulary that never happened; with Qwen's 152k tokens it does (issue #13)."""
    wide, narrow = sample_runs(tool_model, tokenizer, (8, 2))
    for row, (a, b) in enumerate(zip(wide, narrow)):
        first = next((i for i, (x, y) in enumerate(zip(a.completion_ids, b.completion_ids)) if x != y), None)
        if first is None:
            assert a.completion_ids == b.completion_ids, f"row {row}: one rollout is a prefix of the other"
            continue
        x, y = a.completion_ids[first], b.completion_ids[first]
        assert abs(x - y) == 1, f"row {row} diverged at token {first}: {x} vs {y} is not a CDF-boundary move"
        shared_a, shared_b = torch.tensor(a.logprobs[:first]), torch.tensor(b.logprobs[:first])
        assert torch.allclose(shared_a, shared_b, rtol=1e-4, atol=1e-5), \
            f"row {row}: log-probs of the shared prefix differ by more than float32 noise over the vocabulary"


def test_greedy_decoding_does_not_depend_on_the_batch_size(tool_model, tokenizer):
    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox())
    runs = [engine.generate(requests_for(tokenizer, "ABCD", samples=2), SamplingConfig(batch_size=size, **GREEDY))
            for size in (8, 2)]
    assert [r.completion_ids for r in runs[0]] == [r.completion_ids for r in runs[1]], \
        "greedy rollouts must not depend on the batch size"


def test_a_running_cell_does_not_stall_the_other_rows(tool_model, tokenizer, monkeypatch):
    gate = threading.Event()
    sandbox = ScriptedSandbox(gate=gate)
    engine = RolloutEngine(tool_model, tokenizer, sandbox)
    steps_while_running = []
    original_feed = engine._feed_step

    def counting_feed(*args):
        if sandbox.running.is_set():
            steps_while_running.append(1)
            if len(steps_while_running) >= 5:
                gate.set()
        return original_feed(*args)

    monkeypatch.setattr(engine, "_feed_step", counting_feed)
    a, d = engine.generate(requests_for(tokenizer, "AD"), SamplingConfig(**GREEDY))
    assert gate.is_set() and len(steps_while_running) >= 5, "row D must keep decoding while A's cell runs"
    assert a.text == ANSWERS["A"] and d.text == ANSWERS["D"]


# ----------------------------------------------------------------------------------------------
# End to end with the real sandbox


def test_end_to_end_with_the_real_sandbox(tool_model, tokenizer):
    with Sandbox(workers=2, timeout=10.0, preload=()) as sandbox:
        engine = RolloutEngine(tool_model, tokenizer, sandbox)
        rollouts = engine.generate(requests_for(tokenizer, "ABCD", samples=2), SamplingConfig(**GREEDY))
    by_name = dict(zip("ABCD", rollouts[::2]))
    assert [r.text for r in rollouts[::2]] == list(ANSWERS.values()), "real outputs match the trained answers"
    assert [c.observation for c in by_name["C"].cells] == ["42", "43"]
    assert not by_name["B"].cells[0].passed and "ZeroDivisionError" in by_name["B"].cells[0].observation
    for rollout in rollouts:
        assert rollout.finish_reason == "eos"
        assert_logprobs_match_fresh_forward(tool_model, rollout)


def test_the_cell_memo_changes_no_rollout(tool_model, tokenizer):
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=80)
    outcomes = []
    for memo_cells in (0, 4096):
        with Sandbox(workers=2, timeout=10.0, preload=(), memo_cells=memo_cells) as sandbox:
            rollouts = RolloutEngine(tool_model, tokenizer, sandbox).generate(
                requests_for(tokenizer, "ABC", samples=4), sampled, seed=3)
            outcomes.append(([r.completion_ids for r in rollouts], [[c.observation for c in r.cells] for r in rollouts],
                             sandbox.memo_hits))
    (ids_off, seen_off, hits_off), (ids_on, seen_on, hits_on) = outcomes
    assert hits_off == 0 and hits_on > 0, f"the 4 samples of a prompt repeat cells: {hits_on} memo hits"
    assert ids_on == ids_off and seen_on == seen_off, "remembered cells must give the rollouts that running them gives"


def test_rollback_resumes_decoding_before_held_back_bytes():
    """After a rollback, tokens that added no text (half a UTF-8 character) are decoded again."""
    assert rollout_module._decoded_prefix([3, 5, 5, 5], floor=0) == 2, "tokens 2 and 3 added nothing"
    assert rollout_module._decoded_prefix([3, 5, 8], floor=0) == 3
    assert rollout_module._decoded_prefix([0, 0], floor=0) == 0
    assert rollout_module._decoded_prefix([4, 9, 9, 9], floor=3) == 3, "never before the last observation"


# ----------------------------------------------------------------------------------------------
# RL sample building on the engine's own rollouts (every tokenizer's fence and observation splits)


def test_rl_samples_from_engine_rollouts_train_on_model_text_only(tool_model, tokenizer):
    from thor_min.rl import build_samples, step_prefix

    engine = RolloutEngine(tool_model, tokenizer, ScriptedSandbox(fail=(1,)))     # C's second cell fails
    made, = engine.generate(requests_for(tokenizer, ["C"]), SamplingConfig(**GREEDY))
    first, failed = made.cells
    assert first.passed and not failed.passed, "the scripted sandbox fails C's second cell"
    other, = RolloutEngine(tool_model, tokenizer, ScriptedSandbox()).generate(requests_for(tokenizer, ["C"]),
                                                                              SamplingConfig(**GREEDY))
    sample = build_samples([([made, other], [0.0, 1.0])], [])[0]
    n_prompt = len(made.prompt_ids)
    trained = {i - n_prompt for i, m in enumerate(sample.target_mask) if m}
    observation = set(range(first.close_token, first.output_end)) | set(range(failed.close_token, failed.output_end))
    assert trained and not trained & observation, "a trajectory sample must never train on an output block"
    prefix = step_prefix(made, suffix_tokens=3)
    cut = len(prefix) - n_prompt
    assert first.output_end <= cut <= failed.fence_token, \
        f"the step prefix ({cut} tokens) must end after the first output block and before the failed fence"
    assert not tokenizer.decode(prefix[n_prompt + first.output_end:]).count("```"), \
        "the kept reasoning after the last output block holds no fence piece"
