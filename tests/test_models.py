"""Model loading and prompts (thor_min.models): aliases, one-line failures that never wait on the network,
the tiny model through the real loader, 4-bit loading, and the prompt templates."""

import shutil
import socket

import pytest
import torch
from transformers import AutoTokenizer

from thor_min import models, tiny
from thor_min.models import ModelLoadError, build_prompt

QUESTION = "What is 12 * 34?"
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tokenizer = tiny.build_tokenizer(vocab_size=400, corpus=tiny.tiny_corpus(300))
    model = tiny.build_model(tokenizer, tiny.TinyModelSize(hidden_size=64, num_layers=2, intermediate_size=128,
                                                           num_heads=2, num_kv_heads=1))
    return models.save_model_dir(model, tokenizer, tmp_path_factory.mktemp("tiny-dir"), template="tiny")


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty hub cache, so 'is it cached?' is answered the same on every machine."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a TCP connection (no test here may wait on the network)."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"a test tried to connect to {address}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def closed_local_port() -> int:
    """A local TCP port nothing listens on (bound then released), so connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_one_line_naming_the_fix(message: str, hub_id: str):
    assert "\n" not in message, f"the error must be one line, got {message!r}"
    assert hub_id in message, f"the error must name {hub_id!r}: {message!r}"
    assert "local directory" in message and "--model" in message, \
        f"the error must name the fix (a local directory, --model): {message!r}"


# --------------------------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("alias, hub_id", [
    ("qwen-1.5b", "Qwen/Qwen2.5-Math-1.5B"),
    ("qwen-7b", "Qwen/Qwen2.5-Math-7B"),
    ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
    ("qwen3-8b", "Qwen/Qwen3-8B"),
    ("qwen3-32b", "Qwen/Qwen3-32B"),
])
def test_alias_resolves_to_hub_id(alias, hub_id):
    assert models.resolve_model_name(alias) == hub_id, f"{alias} must resolve to {hub_id}"


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-Math-1.5B", "someone/some-model", "./runs/sft", "/abs/dir", "qwen"])
def test_other_names_pass_through(name):
    assert models.resolve_model_name(name) == name, f"{name!r} is not an alias and must be returned unchanged"


# ------------------------------------------------------------------------------------- loading failures


@pytest.mark.parametrize("name, hub_id", [("qwen-1.5b", "Qwen/Qwen2.5-Math-1.5B"),
                                          ("thor-min-tests/not-cached", "thor-min-tests/not-cached")])
@pytest.mark.parametrize("loader", [models.load_model, models.load_tokenizer])
def test_offline_uncached_hub_id_fails_in_one_line(monkeypatch, empty_hub_cache, no_network, loader, name, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        loader(name)
    assert_one_line_naming_the_fix(str(error.value), hub_id)
    assert not no_network, f"HF_HUB_OFFLINE=1 must not open connections, tried {no_network}"


def test_unreachable_endpoint_fails_in_one_line_after_one_refused_connection(monkeypatch, empty_hub_cache):
    port = closed_local_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    real_connect, attempts = socket.create_connection, []

    def local_only(address, *args, **kwargs):
        attempts.append(address)
        if address != ("127.0.0.1", port):
            raise AssertionError(f"connection to {address}, expected only the test endpoint")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", local_only)
    with pytest.raises(ModelLoadError) as error:
        models.load_model("qwen-1.5b")
    assert_one_line_naming_the_fix(str(error.value), "Qwen/Qwen2.5-Math-1.5B")
    assert attempts == [("127.0.0.1", port)], f"expected exactly one probe of the endpoint, got {attempts}"


def test_http_endpoint_without_port_is_probed_on_port_80(monkeypatch, empty_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1")
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ModelLoadError):
        models.load_model("thor-min-tests/not-cached")
    assert attempts == [("127.0.0.1", 80)], f"an http endpoint must be probed on port 80, got {attempts}"


@pytest.mark.parametrize("name", ["./no/such/dir", "no/such/dir", "/no/such/dir", "~/no/such/dir"])
def test_missing_local_path_fails_in_one_line(monkeypatch, tmp_path, no_network, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        models.load_model(name)
    message = str(error.value)
    assert "\n" not in message and name in message, f"one line naming {name!r}, got {message!r}"


def test_directory_without_a_model_fails_in_one_line(tmp_path, no_network):
    with pytest.raises(ModelLoadError) as error:
        models.load_model(str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message, f"one line naming the directory, got {message!r}"


# ------------------------------------------------------------------------------------ loading the tiny dir


def test_load_model_gives_eval_fp32_cpu_model_and_tokenizer(tiny_dir, no_network):
    if torch.cuda.is_available():
        pytest.skip("device 'auto' picks cuda on this machine; this test is about the CPU default")
    model, tokenizer = models.load_model(str(tiny_dir))
    parameter = next(model.parameters())
    assert not model.training, "load_model must return the model in eval mode"
    assert parameter.device.type == "cpu", f"model on {parameter.device}, expected cpu"
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "CPU default dtype must be float32"
    assert tokenizer.encode("12") == [tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")], \
        "the tokenizer returned is not the tiny one"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "the tiny tokenizer's own pad token must be kept"


def test_load_model_forward_runs(tiny_dir):
    model, tokenizer = models.load_model(str(tiny_dir), device="cpu")
    ids = torch.tensor([tokenizer.encode("Question: What is 12 * 34?\nAnswer:\n")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all(), \
        f"bad logits {tuple(logits.shape)}"


def test_cached_hub_id_loads_offline(monkeypatch, empty_hub_cache, tiny_dir, no_network):
    snapshot = empty_hub_cache / "models--thor-min-tests--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (empty_hub_cache / "models--thor-min-tests--tiny" / "refs").mkdir()
    (empty_hub_cache / "models--thor-min-tests--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model("thor-min-tests/tiny", device="cpu")
    assert model.config.hidden_size == 64 and tokenizer.eos_token_id is not None, \
        "a hub id present in the cache must load without the network"


def test_pick_dtype_is_fp32_on_cpu():
    assert models.pick_dtype(torch.device("cpu")) == torch.float32, "CPU default dtype must be float32"
    assert models.pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16, "an explicit dtype wins"


def test_pick_device_auto_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    assert models.pick_device("auto") == torch.device("cpu"), "no cuda here, so auto must pick cpu"
    assert models.pick_device("cpu") == torch.device("cpu"), "an explicit device wins"


def test_load_model_in_4bit_quantizes_the_linears(tiny_dir):
    from thor_min.lora import bnb_4bit_available

    available, reason = bnb_4bit_available("cpu")
    if not available:
        pytest.skip(f"bitsandbytes 4-bit unavailable here: {reason}")
    model, tokenizer = models.load_model(str(tiny_dir), device="cpu", load_in_4bit=True)
    linears = {name: type(module).__name__ for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")}
    not_4bit = {name: kind for name, kind in linears.items() if kind != "Linear4bit"}
    assert linears and not not_4bit, f"linears left unquantised: {not_4bit}"
    ids = torch.tensor([tokenizer.encode(QUESTION)])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.dtype == torch.float32, \
        f"4-bit forward gave {logits.dtype} / non-finite logits"


# ---------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("tools", [True, False])
def test_tiny_prompt(tools):
    assert build_prompt("tiny", QUESTION, tools=tools) == f"Question: {QUESTION}\nAnswer:\n", "tiny prompt format"


def test_none_prompt_is_the_question_verbatim():
    question = "  Find x.\n$x^2 = 4$  "
    assert build_prompt("none", question) == question, "template none must return the question unchanged"


@pytest.mark.parametrize("tools", [True, False])
def test_qwen_math_prompt(tools):
    prompt = build_prompt("qwen-math", QUESTION, tools=tools)
    assert QUESTION in prompt, "the question must be in the prompt"
    assert "\\boxed{}" in prompt, "the prompt must ask for the answer in \\boxed{}"
    assert ("python" in prompt.lower()) == tools, f"python must be mentioned iff tools ({tools}): {prompt!r}"


def test_qwen3_prompt_without_chat_template_fails(tiny_dir):
    with pytest.raises(ModelLoadError, match="chat template"):
        build_prompt("qwen3", QUESTION)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = None
    with pytest.raises(ModelLoadError, match="chat template"):
        build_prompt("qwen3", QUESTION, tokenizer=tokenizer)


@pytest.mark.parametrize("tools", [True, False])
def test_qwen3_prompt_puts_the_question_in_the_user_turn(tiny_dir, tools):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    prompt = build_prompt("qwen3", QUESTION, tools=tools, tokenizer=tokenizer)
    user_turn = prompt.split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
    assert prompt.startswith("<|im_start|>user\n") and QUESTION in user_turn, f"question not in the user turn: {prompt!r}"
    assert "\\boxed{}" in user_turn and ("python" in user_turn.lower()) == tools, f"instructions wrong: {user_turn!r}"
    assert prompt.endswith("<|im_start|>assistant\n<think>\n"), \
        f"the prompt must end with the assistant turn, thinking on: {prompt[-60:]!r}"


def test_unknown_template_lists_valid_names():
    with pytest.raises(ModelLoadError) as error:
        build_prompt("chatml", QUESTION)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in models.TEMPLATES), \
        f"one line listing {models.TEMPLATES}, got {message!r}"


def test_detect_template_defaults(tmp_path):
    assert models.detect_template(str(tmp_path)) == "qwen-math", "a dir without thor_min.json is qwen-math"
    assert models.detect_template("qwen-1.5b") == "qwen-math", "Qwen2.5-Math is qwen-math"
    assert models.detect_template("qwen3-8b") == "qwen-math", "qwen3 without a known chat template falls back"

    class WithChat:
        chat_template = SIMPLE_CHAT_TEMPLATE

    assert models.detect_template("qwen3-8b", WithChat()) == "qwen3", "qwen3 with a chat template is qwen3"
