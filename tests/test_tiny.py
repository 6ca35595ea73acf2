"""The tiny model and tokenizer (thor_min.tiny): exact round trips, and THOR.md section 7's tokenizer trap.

The trap: transformers 5.x `AutoTokenizer.from_pretrained(dir)` on a dir whose config says `qwen2` builds
`Qwen2Tokenizer`, which ignores the saved normalizer/pre-tokenizer and applies Qwen's own. The tokenizer
built in code must therefore give the same ids as the one `AutoTokenizer` rebuilds from the saved dir.
"""

import json
import random
import unicodedata

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from thor_min import models, tasks, tiny



@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.build_model(tokenizer).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    out = tmp_path_factory.mktemp("tiny-model")
    models.save_model_dir(model, tokenizer, out, template="tiny")
    return out


@pytest.fixture(scope="module")
def auto_tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def world_texts() -> list[str]:
    """Prompt + reference of every test and held-out problem."""
    return [models.build_prompt("tiny", p.question) + p.reference
            for p in tasks.test_split() + tasks.heldout_split()]


def tool_texts() -> list[str]:
    """Tool-style text: python fences, outputs, tracebacks, the EOS marker, a whole tool trajectory."""
    texts = []
    for problem in tasks.test_split(40):
        lines = problem.reference.splitlines()
        cells = []
        for line in lines[:-1]:
            match = tasks.STATEMENT_RE.match(line)
            code = tasks.statement_code(match["expression"])
            cells.append(f"```python\n{code}\n```\n```output\n{match['value']}\n```\n")
        texts.append(models.build_prompt("tiny", problem.question) + "".join(cells) + lines[-1] + tiny.EOS_TOKEN)
    texts += [
        "```python\nx = 3 ** 40\nprint(x % 1000, x // 7)\n```\n```output\n1\n5\n```\n",
        "```python\nprint(1/0)\n```\n```output\nTraceback (most recent call last):\n  File \"<cell>\", line 1\n"
        "ZeroDivisionError: division by zero\n```\n",
        "```python\nfor k in range(3):\n\tprint(k**2)\n```\n```output\n0\n1\n4\n```\n",
        "```output\nTimeoutError: execution exceeded the time limit\n```\n",
        "def f(a, b):\n    return {'a': a, \"b\": b}  # it's done, we're ok\r\n",
    ]
    return texts


def unicode_texts(count: int = 200) -> list[str]:
    """Seeded random text over awkward characters: whitespace runs, CR/LF, combining marks, emoji, CJK, RTL."""
    pool = (list("aZ09 .,;:!?()[]{}<>=+-*/^\\`'\"_#@$%&|~") + [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n",
            "\u00a0", "\u3000", "\u2028", "\u200b", "\ufeff", "\u0301", "\u0308", "é", "ß", "ﬁ", "İ", "ı", "Ω",
            "Ω", "²", "①", "½", "٣", "日本語", "한국어", "עברית", "العربية", "🙂", "👩‍👩‍👧", "🇫🇷", "\x00", "\x7f",
            "<|endoftext|>", "<|pad|>", "123456", "'s", "'LL"])
    rng = random.Random(0)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(count)]


ALL_TEXTS = {"world": world_texts, "tool": tool_texts, "unicode": unicode_texts}


@pytest.fixture(scope="module")
def texts():
    return {name: make() for name, make in ALL_TEXTS.items()}


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["world", "tool"])
def test_tokenizer_round_trips_tiny_world_and_tool_text(tokenizer, texts, kind):
    bad = [t for t in texts[kind] if tokenizer.decode(tokenizer.encode(t)) != t]
    assert not bad, f"{len(bad)} {kind} texts change under decode(encode(.)), e.g. {bad[0]!r}"


def test_tokenizer_round_trips_arbitrary_nfc_text(tokenizer, texts):
    nfc = [unicodedata.normalize("NFC", t) for t in texts["unicode"]]
    bad = [t for t in nfc if tokenizer.decode(tokenizer.encode(t)) != t]
    assert not bad, f"{len(bad)} NFC texts change under decode(encode(.)), e.g. {bad[0]!r}"


def test_tokenizer_applies_nfc_like_qwen(tokenizer, auto_tokenizer):
    decomposed = "cafe\u0301"   # e + combining acute: NFC composes it (Qwen's normalizer does the same)
    assert tokenizer.decode(tokenizer.encode(decomposed)) == "caf\u00e9", "the built tokenizer must apply NFC"
    assert auto_tokenizer.decode(auto_tokenizer.encode(decomposed)) == "caf\u00e9", "Qwen2Tokenizer applies NFC"


def test_tiny_world_text_needs_no_byte_fallback(tokenizer, texts):
    """The vocabulary is learned from tiny-world text, so its prompts encode well below one token per byte."""
    tokens = sum(len(tokenizer.encode(t)) for t in texts["world"])
    chars = sum(len(t) for t in texts["world"])
    assert tokens < 0.6 * chars, f"{tokens} tokens for {chars} characters: the BPE merges are not being used"


# ---------------------------------------------------------------------------------- THE TRAP (section 7)


def test_auto_tokenizer_builds_qwen2_tokenizer(auto_tokenizer):
    """Documents the trap's precondition: config.json says qwen2, so AutoTokenizer builds Qwen2Tokenizer."""
    assert type(auto_tokenizer).__name__ == "Qwen2Tokenizer", \
        f"AutoTokenizer built {type(auto_tokenizer).__name__}; the trap test below must still compare ids"


@pytest.mark.parametrize("kind", list(ALL_TEXTS))
def test_auto_tokenizer_gives_identical_ids(tokenizer, auto_tokenizer, texts, kind):
    bad = [t for t in texts[kind] if tokenizer.encode(t) != auto_tokenizer.encode(t)]
    assert not bad, (f"{len(bad)} {kind} texts encode differently with the built tokenizer and AutoTokenizer "
                     f"(THOR.md section 7), e.g. {bad[0]!r}: {tokenizer.encode(bad[0])} vs "
                     f"{auto_tokenizer.encode(bad[0])}")


def test_auto_tokenizer_keeps_special_tokens(tokenizer, auto_tokenizer):
    for name in ("eos_token_id", "pad_token_id"):
        assert getattr(auto_tokenizer, name) == getattr(tokenizer, name), f"{name} differs after from_pretrained"
    assert len(auto_tokenizer) == len(tokenizer), "vocabulary size differs after from_pretrained"


def test_the_trap_is_real_for_a_tokenizer_without_qwens_split(tmp_path):
    """Negative control: a GPT-2-style byte-level BPE saved under a qwen2 config is NOT reproduced by AutoTokenizer.

    This is why the identical-ids test above can fail: if this control ever passes, transformers stopped
    overriding the saved pre-tokenizer and the trap (and the comparison) may need revisiting.
    """
    backend = Tokenizer(tokenizer_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # GPT-2 regex: digits grouped
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(tiny.tiny_corpus(200), trainers.BpeTrainer(
        vocab_size=400, special_tokens=[tiny.EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    naive = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tiny.EOS_TOKEN)
    naive.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(naive)).save_pretrained(tmp_path)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    text = "What is 1783 * 77? 1783 * 77 = 137291."
    assert naive.encode(text) != rebuilt.encode(text), \
        "a non-Qwen pre-tokenizer survived AutoTokenizer: the section-7 trap no longer applies"


@pytest.mark.parametrize("number", ["178377", "1000000007", "0"])
def test_digits_are_one_per_token(tokenizer, auto_tokenizer, number):
    for name, tok in (("built", tokenizer), ("AutoTokenizer", auto_tokenizer)):
        pieces = [tok.decode([i]) for i in tok.encode(number)]
        assert pieces == list(number), f"{name}: {number!r} tokenised as {pieces}, expected one digit per token"


def test_digits_are_one_per_token_inside_a_statement(tokenizer):
    text = "1783 * 77 = 137291."
    digit_pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    multi = [p for p in digit_pieces if sum(c.isdigit() for c in p) > 1]
    assert not multi, f"tokens holding several digits in {text!r}: {multi}"


# ------------------------------------------------------------------------------------------------ model


def test_model_round_trips_through_save_and_from_pretrained(model, model_dir, tokenizer):
    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer(["Question: What is 12 * 34?\nAnswer:\n", "gcd(12, 18) = 6.\nThe answer is"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
        after = loaded(**batch).logits
    assert before.shape == after.shape == (2, batch["input_ids"].shape[1], len(tokenizer)), \
        f"logits shapes {tuple(before.shape)} / {tuple(after.shape)}"
    assert torch.allclose(before, after, atol=1e-5, rtol=0), \
        f"logits differ after from_pretrained (max |diff| {(before - after).abs().max().item():.3g})"


def test_loaded_model_keeps_tied_embeddings(model_dir):
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr(), \
        "lm_head must stay tied to the input embeddings after from_pretrained"


def expected_parameters(size: tiny.TinyModelSize, vocab: int) -> int:
    """Qwen2 with tied embeddings: q/k/v have biases, o and the MLP do not; two RMSNorms per layer + final."""
    head_dim = size.hidden_size // size.num_heads
    kv = size.num_kv_heads * head_dim
    attention = (size.hidden_size * size.hidden_size + size.hidden_size) + 2 * (size.hidden_size * kv + kv) \
        + size.hidden_size * size.hidden_size
    mlp = 3 * size.hidden_size * size.intermediate_size
    layer = attention + mlp + 2 * size.hidden_size
    return vocab * size.hidden_size + size.num_layers * layer + size.hidden_size


def test_parameter_count_matches_the_size(model, tokenizer):
    size = tiny.TinyModelSize()
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(size, len(tokenizer)), \
        f"{count} parameters, expected {expected_parameters(size, len(tokenizer))} from {size}"
    assert 100_000 < count < 5_000_000, f"{count} parameters is not 'a few million or less'"


def test_config_matches_the_size(model, tokenizer):
    size, config = tiny.TinyModelSize(), model.config
    got = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
           config.num_key_value_heads, config.max_position_embeddings, config.vocab_size)
    want = (size.hidden_size, size.num_layers, size.intermediate_size, size.num_heads, size.num_kv_heads,
            size.max_positions, len(tokenizer))
    assert got == want, f"config dims {got} != TinyModelSize + vocab {want}"
    assert config.model_type == "qwen2" and config.tie_word_embeddings, "a tied Qwen2 config is expected"


def test_model_is_float32(model):
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, f"parameter dtypes {dtypes}"


def test_eos_and_pad_are_set_and_distinct(model, model_dir, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert eos is not None and pad is not None and eos != pad, f"eos {eos} and pad {pad} must be set and differ"
    assert (model.config.eos_token_id, model.config.pad_token_id) == (eos, pad), "model config ids != tokenizer ids"
    saved = json.loads((model_dir / "config.json").read_text())
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (eos, pad), "saved config.json lost eos/pad ids"
    assert tokenizer.convert_ids_to_tokens([eos, pad]) == [tiny.EOS_TOKEN, tiny.PAD_TOKEN], "eos/pad tokens"


def test_eos_marker_encodes_to_one_token(tokenizer, auto_tokenizer):
    for name, tok in (("built", tokenizer), ("AutoTokenizer", auto_tokenizer)):
        ids = tok.encode(f"The answer is \\boxed{{7}}.{tiny.EOS_TOKEN}")
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1, \
            f"{name}: EOS text must encode to the single eos id, got {ids[-3:]}"


# ---------------------------------------------------------------------------------------- model dir files


def test_metadata_names_the_tiny_template(model_dir):
    assert json.loads((model_dir / models.METADATA_FILE).read_text()) == {"template": "tiny"}, \
        "thor_min.json must say template tiny"
    assert models.detect_template(str(model_dir)) == "tiny", "detect_template must read thor_min.json"


def test_create_tiny_base_writes_a_loadable_tiny_dir(tmp_path):
    out = tiny.create_tiny_base(tmp_path / "base", size=tiny.TinyModelSize(hidden_size=32, num_layers=1,
                                                                           intermediate_size=64, num_heads=2,
                                                                           num_kv_heads=1), vocab_size=300)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.hidden_size == 32 and loaded.config.vocab_size == 300, "create_tiny_base ignored its size"
    assert models.detect_template(str(out)) == "tiny", "create_tiny_base must write thor_min.json with tiny"
