"""The tiny model: a few-million-parameter Qwen2 causal LM and a byte-level BPE tokenizer built in code.

Why: every later stage (TIRGen, SFT, RL, evaluation, generate.py) must load the tiny model exactly the
way it loads Qwen (`AutoModelForCausalLM.from_pretrained(dir)`, `AutoTokenizer.from_pretrained(dir)`),
so the tiny path exercises the real code path. The model is a stock `Qwen2ForCausalLM` with small
dimensions; the tokenizer is a `tokenizers` BPE trained on the tiny-world corpus.

The trap this module avoids (THOR.md section 7): for a model directory whose config says
`model_type: qwen2`, transformers 5.x `AutoTokenizer` builds `Qwen2Tokenizer`, which ignores the saved
normalizer/pre-tokenizer and applies Qwen's own (NFC, Qwen's split regex that isolates every digit,
byte-level with no prefix space). So we build our tokenizer with exactly that pipeline; a test checks
that `AutoTokenizer` and the tokenizer built here give identical ids.

The pretrained base ships in `assets/tiny-base` with its `pretraining.json` (settings and results), so a run
starts from the same bytes on every machine; `uses_shipped_base` says whether a preset asks for exactly that
base (pipeline.stage_pretrain copies it, or pretrains another).

Limits: the vocabulary is tiny (a few hundred tokens) and learned from tiny-world text, so other text
encodes as raw bytes (correct, just long).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from thor_min import tasks
from thor_min.config import Preset
from thor_min.models import save_model_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Qwen2's pre-tokenizer split: contractions, letter runs, ONE digit at a time, punctuation runs, newlines.
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Text the model will meet at run time besides solutions: fences, common python and error lines.
EXTRA_CORPUS = (
    "```python\n", "```\n", "```output\n", "print(", "import math\n", "math.gcd(", "math.lcm(",
    "pow(", "sum(", "range(", "for k in ", "k**2", "//",
    "SyntaxError: invalid syntax", "NameError: name 'x' is not defined", "ZeroDivisionError: division by zero",
    "TypeError: unsupported operand type(s)", "SyntaxError: unexpected EOF while parsing",
    "TimeoutError: execution exceeded the time limit", "Question: ", "\nAnswer:\n",
)


@dataclass(frozen=True)
class TinyModelSize:
    """Dimensions of the tiny Qwen2 model (defaults: ~1.1 M parameters)."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512


def tiny_corpus(n_problems: int = 4000, seed: int = tasks.DEFAULT_SEED) -> list[str]:
    """Texts the tokenizer is trained on: prompts, plain references, tool-style cells and outputs."""
    texts = list(EXTRA_CORPUS)
    for problem in tasks.train_split(n_problems, seed) + tasks.heldout_split(200, seed):
        texts.append(f"Question: {problem.question}\nAnswer:\n{problem.reference}")
        for line in problem.reference.splitlines():
            match = tasks.STATEMENT_RE.match(line)
            code = match and tasks.statement_code(match["expression"])
            if code:
                texts.append(f"```python\n{code}\n```\n```output\n{match['value']}\n```\n")
    return texts


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's normalizer and pre-tokenizer; wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus if corpus is not None else tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=None, bos_token=None)


def build_model(tokenizer: PreTrainedTokenizerFast, size: TinyModelSize = TinyModelSize(),
                seed: int = 0) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM sized by `size`, with tied embeddings, in fp32."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads, max_position_embeddings=size.max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def create_tiny_base(out_dir: str | Path, size: TinyModelSize = TinyModelSize(), vocab_size: int = 512,
                     seed: int = 0) -> Path:
    """Build tokenizer + untrained model and save both to `out_dir` (loadable with from_pretrained)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    model = build_model(tokenizer, size, seed)
    save_model_dir(model, tokenizer, out_dir, template="tiny")
    return out_dir


# ----------------------------------------------------------------------------------------------
# The shipped base (pipeline.stage_pretrain copies it when the preset asks for this base)


SHIPPED_BASE = Path(__file__).parent / "assets" / "tiny-base"
PRETRAINING_RECORD = "pretraining.json"   # in a tiny base directory: how it was pretrained, where, how long


def pretraining_settings(preset: Preset, seed: int) -> dict:
    """Everything the tiny base depends on that a flag can change (the recipe, not the code)."""
    return {"steps": preset.pretrain_steps, "seed": seed, "lr": preset.pretrain_lr, "batch": preset.pretrain_batch,
            "block_tokens": preset.pretrain_block_tokens, "check_every": preset.pretrain_check_every,
            "model": asdict(TinyModelSize()), "micro_batch_tokens": preset.micro_batch_tokens}


def uses_shipped_base(preset: Preset, seed: int) -> bool:
    """--tiny-base shipped, and the shipped base was pretrained with exactly these settings (a flag that changes
    them trains a new base)."""
    record = SHIPPED_BASE / PRETRAINING_RECORD
    return (preset.tiny_base == "shipped" and record.is_file()
            and json.loads(record.read_text())["settings"] == pretraining_settings(preset, seed))
