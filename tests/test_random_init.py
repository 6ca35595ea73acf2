"""Real configs and --random-init: every shipped config builds its published architecture (counted on the meta
device, no memory), and generate.py --random-init runs end to end on a shrunken copy of a real config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from thor_min import models

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED_PARAMETERS = {  # billions, as the model cards state them (tied heads counted once)
    "qwen-1.5b": 1.54, "qwen-7b": 7.62, "qwen3-1.7b": 1.72, "qwen3-8b": 8.19, "qwen3-32b": 32.76,
}


def shrunken_config(alias: str, path: Path) -> Path:
    """The alias's real config with tiny dims (vocabulary, special ids, rope, tying kept)."""
    config = json.loads(models.config_path(alias).read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("alias", sorted(models.MODEL_ALIASES))
def test_each_shipped_config_builds_the_published_architecture(alias):
    config = AutoConfig.from_pretrained(str(models.config_path(alias)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(billions - PUBLISHED_PARAMETERS[alias]) < 0.01, f"{alias}: {billions:.3f} B parameters"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config.tie_word_embeddings


def test_random_init_uses_the_real_tokenizer_and_the_loaders_dtype(tmp_path):
    model, tokenizer = models.load_model(str(shrunken_config("qwen3-1.7b", tmp_path / "c.json")), device="cpu",
                                         dtype="bfloat16", random_init=True)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 151936
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template, "Qwen3 tokenizer with its template"
    assert tokenizer.encode("```python\n", add_special_tokens=False) == tokenizer.encode("```python\n")


def test_random_init_of_a_hub_id_is_a_one_line_error():
    with pytest.raises(models.ModelLoadError, match="alias"):
        models.load_model("someone/unknown-model", device="cpu", random_init=True)


@pytest.mark.slow
def test_generate_random_init_runs_end_to_end(tmp_path):
    config = shrunken_config("qwen-1.5b", tmp_path / "config.json")
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(config), "--random-init",
                             "--device", "cpu", "--max-new-tokens", "8", "--workers", "1", "--template", "qwen-math",
                             "--out", str(out), "What is 2 + 3?"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["tokens"] == 8 or record["finish_reason"] == "eos", record
