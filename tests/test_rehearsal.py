"""The rehearsal bench's code path on a shrunken real config (tiny dims, real vocabulary and tokenizer): every
stage runs, the scripted logits force executed cells, step-level samples and self-correction retries, and each
stage reports a measured peak memory."""

import json

import pytest
import torch

from thor_min.bench import rehearsal
from thor_min.offline import real_tokenizer
from test_random_init import shrunken_config


def test_scripted_successors_follow_the_script():
    tokenizer = real_tokenizer("qwen2.5")
    scripted = rehearsal.ScriptedLogits(model=None, tokenizer=tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    text = " We compute:\n```python\nprint(8 / 2)\n```\n"
    ids = encode(text)
    assert scripted.first == [ids[0]]
    assert all(scripted.successors[a] == [b] or b in scripted.successors[a] for a, b in zip(ids, ids[1:])), \
        "each scripted token leads to the next one of the cell"


@pytest.mark.slow
def test_rehearsal_runs_every_stage_on_a_shrunken_config(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "rehearsal.json"
    try:
        code = rehearsal.main(["--model", "qwen-1.5b", "--config", str(shrunken_config("qwen-1.5b", tmp_path / "c.json")),
                               "--device", "cpu", "--threads", "1", "--prompts", "1", "--new-tokens", "40", "--decode-steps", "4",
                               "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == ["load", "tirgen", "sft", "rl", "eval", "decode"]
    assert all(stage["peak_bytes"] >= stage["start_bytes"] > 0 for stage in stages.values()), "memory measured"
    assert stages["tirgen"]["facts"]["attempts"] == 4, "1 problem x G attempts"
    assert stages["rl"]["facts"]["step_samples"] > 0 and stages["rl"]["facts"]["trajectory_samples"] > 0
    assert stages["eval"]["facts"]["retries"] > 0, "failed cells were self-corrected"
    assert report["projection"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2, "2 x layers x kv heads x head dim x bf16"


def test_a_model_too_big_for_the_limit_is_refused_with_the_reason(capsys):
    assert rehearsal.main(["--model", "qwen-7b", "--max-gib", "10"]) == 2
    assert "14.2 GiB" in capsys.readouterr().out
