"""Model loading and prompt templates: one table of aliases, one loader, one place for prompts.

Every stage loads models the same way: `load_model(name)` resolves an alias (`qwen-1.5b` ->
`Qwen/Qwen2.5-Math-1.5B`) or takes a hub id or a local directory, and goes through
`AutoModelForCausalLM` / `AutoTokenizer`. The tiny model is saved with `save_pretrained`, so it takes
exactly this path too. Device and dtype default sensibly: bf16 on a GPU that supports it, fp32 on
CPU. Options for 4-bit (bitsandbytes NF4) and gradient checkpointing plug in here; LoRA is applied
afterwards by `thor_min.lora`.

Random init (`random_init=True`, `--random-init` on train.py and generate.py): a model of exactly an alias's
architecture, from the published `config.json` shipped in `thor_min/configs/` (or any config.json path), with
random weights and the genuine tokenizer (`thor_min.offline.real_tokenizer`): no network, no weights. It
rehearses the real-model path at real shapes (`python -m thor_min.bench rehearsal`); its text is noise.

Failure is one clear line, never a traceback wall: a hub id that cannot be fetched (no network) fails
fast, naming the fix (download it elsewhere and pass the local directory).

Prompt templates (our own wording): `qwen-math` is raw text for base Qwen2.5-Math models (no chat
template), `qwen3` uses the tokenizer's chat template with thinking on, `tiny` is the tiny world's
`Question: ...\\nAnswer:\\n`, and `none` is the problem text verbatim. Each model directory we write
carries `thor_min.json` naming its template so `--template auto` finds it.
"""

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

MODEL_ALIASES = {
    "qwen-1.5b": "Qwen/Qwen2.5-Math-1.5B",
    "qwen-7b": "Qwen/Qwen2.5-Math-7B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-32b": "Qwen/Qwen3-32B",   # TIRGen's LLM critic in the paper
}
TEMPLATES = ("tiny", "qwen-math", "qwen3", "none")
METADATA_FILE = "thor_min.json"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # published config.json of every alias

TOOL_INSTRUCTIONS = (
    "You may run Python: write code in a ```python block that prints what you need. Each block runs "
    "on its own in a fresh interpreter (import what you use), and its printed output is shown to you "
    "in an ```output block. "
)
REASONING_INSTRUCTIONS = "Reason step by step and put the final answer in \\boxed{}."


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message is one line that names the fix."""


# ----------------------------------------------------------------------------------------------
# Resolution and loading


def resolve_model_name(name: str) -> str:
    """Alias -> hub id; anything else (hub id or local directory) is returned unchanged."""
    return MODEL_ALIASES.get(name, name)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU (unless asked otherwise)."""
    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint? (Saves 30 s of retries when offline.)"""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _locate(name: str) -> tuple[str, bool]:
    """(path or hub id, whether it must be loaded from the local cache only)."""
    resolved = resolve_model_name(name)
    if Path(resolved).expanduser().is_dir():
        return str(Path(resolved).expanduser()), True
    if resolved.startswith((".", "/", "~")) or resolved.count("/") != 1:
        raise ModelLoadError(f"model {name!r} is neither an alias ({', '.join(MODEL_ALIASES)}), "
                             f"a local directory, nor a hub id of the form OWNER/NAME")
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(resolved, "config.json"), str)
    except Exception:  # noqa: BLE001 -- an odd cache layout just means "not cached"
        cached = False
    if not cached and not _hub_reachable():
        raise ModelLoadError(f"cannot download {resolved!r}: the model hub is not reachable from this machine; "
                             f"download it where there is network (huggingface-cli download {resolved}) "
                             f"and pass the local directory with --model /path/to/dir")
    return resolved, cached


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    location, local_only = _locate(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token   # our masks never rely on pad ids (THOR.md section 7)
    return tokenizer


def config_path(name: str) -> Path:
    """The shipped config.json of an alias, or `name` itself if it is a config.json file."""
    if name in MODEL_ALIASES:
        return CONFIG_DIR / f"{name}.json"
    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    raise ModelLoadError(f"--random-init needs an alias ({', '.join(MODEL_ALIASES)}) or a config.json file, "
                         f"got {name!r}")


def random_init_model(name: str, dtype: torch.dtype):
    """(model, tokenizer): `name`'s architecture with random weights (seeded by torch's RNG), real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from thor_min.offline import real_tokenizer

    config = AutoConfig.from_pretrained(str(config_path(name)))
    config._name_or_path = f"random-init:{resolve_model_name(name)}"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, real_tokenizer("qwen3" if config.model_type == "qwen3" else "qwen2.5")


def load_model(name: str, *, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False,
               gradient_checkpointing: bool = False, random_init: bool = False):
    """Load (model, tokenizer) for `name` (alias, hub id or directory) on `device` in eval mode.

    `random_init`: build `name`'s architecture (alias or config.json file) with random weights instead."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    if load_in_4bit:
        from thor_min.lora import bnb_4bit_available

        available, reason = bnb_4bit_available(torch_device.type)
        if not available:
            raise ModelLoadError(f"--load-in-4bit needs a working bitsandbytes ({reason}); "
                                 f"pip install 'thor-min[4bit]' or drop the flag")
        torch_dtype = torch.float32 if torch_dtype == torch.float32 else torch.bfloat16   # the compute dtype
    if random_init:
        model, tokenizer = random_init_model(name, torch_dtype)
    else:
        location, local_only = _locate(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, local_files_only=local_only,
                                                         attn_implementation="sdpa")
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
        tokenizer = load_tokenizer(name)
    if load_in_4bit:   # NF4 + double quant, quantised as each linear moves to the device (QLoRA base)
        from thor_min.lora import bnb_4bit_config, quantize_4bit

        quantize_4bit(model, bnb_4bit_config(torch_dtype), device=torch_device)
    model.to(torch_device)
    if gradient_checkpointing:
        from thor_min.lora import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.eval()
    return model, tokenizer


def save_model_dir(model, tokenizer, out_dir: str | Path, template: str, state_dict: dict | None = None) -> Path:
    """`save_pretrained` model and tokenizer, plus `thor_min.json` naming the prompt template (`state_dict`:
    whole weights to write instead of the model's own, e.g. gathered from an FSDP2-sharded model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    write_metadata(out_dir, template)
    return out_dir


def write_metadata(out_dir: str | Path, template: str, **facts) -> None:
    """Record the prompt template family (read back by `detect_template`) and any `facts` next to the weights."""
    (Path(out_dir) / METADATA_FILE).write_text(json.dumps({"template": template, **facts}) + "\n")


def read_metadata(model_dir: str | Path) -> dict:
    """The `thor_min.json` of a model directory we wrote, or {} for any other model."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------
# Prompt templates


def detect_template(name: str, tokenizer=None) -> str:
    """The template family of a model: its `thor_min.json`, else Qwen3 -> `qwen3`, else `qwen-math`."""
    metadata = read_metadata(Path(resolve_model_name(name)).expanduser())
    if metadata:
        return metadata["template"]
    lowered = resolve_model_name(name).lower()
    if "qwen3" in lowered and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "qwen3"
    return "qwen-math"


def build_prompt(template: str, question: str, *, tools: bool = True, tokenizer=None) -> str:
    """The prompt text for `question` under `template`; `tools` adds the python instructions."""
    if template == "none":
        return question
    if template == "tiny":
        return f"Question: {question}\nAnswer:\n"
    instructions = (TOOL_INSTRUCTIONS if tools else "") + REASONING_INSTRUCTIONS
    if template == "qwen-math":
        return f"{instructions}\n\nProblem: {question}\n\nSolution:\n"
    if template == "qwen3":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError("the qwen3 template needs a tokenizer with a chat template; use --template qwen-math")
        messages = [{"role": "user", "content": f"{question}\n\n{instructions}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=True)
    raise ModelLoadError(f"unknown template {template!r}: choose one of auto, {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer, template: str, question: str, *, tools: bool = True) -> list[int]:
    """The prompt's token ids, exactly as the rollout engine is given them (the template adds any special tokens)."""
    return tokenizer.encode(build_prompt(template, question, tools=tools, tokenizer=tokenizer), add_special_tokens=False)


def silence_library_logs() -> None:
    """Quiet the harmless warnings transformers and bitsandbytes print on CPU."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
