"""The lean decode step: the transformers forward's logits up to float rounding, and the engine's outputs unchanged."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from thor_min.decode import decode_attention, decode_step_for, hf_decode_step, lean_decode_step
from thor_min.kvcache import RolloutCache, attention_bias
from thor_min.rollout import RolloutEngine, RolloutRequest, SamplingConfig


def small_model(kind: str, kv_heads: int, attn: str = "sdpa"):
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    config = config_class(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=128,
                          attn_implementation=attn)
    torch.manual_seed(0)
    return model_class(config).eval()


def decode_logits(model, step, rows=3, prompt=6, steps=5) -> torch.Tensor:
    """Logits [steps, rows, V] of `step` after a left-padded prefill, with masked holes in the columns."""
    cache = RolloutCache(model.config.num_hidden_layers, prompt + steps)
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(rows, prompt + steps, dtype=torch.bool)
    mask[0, :2] = False                                                   # a left-padded row
    positions = (mask[:, :prompt].long().cumsum(-1) - 1).clamp(min=0)
    ids = torch.randint(0, 96, (rows, prompt), generator=generator)
    with torch.inference_mode():
        model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
              attention_mask=attention_bias(mask[:, :prompt], prompt, torch.float32))
        out = []
        for s in range(steps):
            column = prompt + s
            mask[1, column] = s != 2                                          # row 1 skips a step (a hole)
            token = torch.randint(0, 96, (rows, 1), generator=generator)
            position = mask[:, :column + 1].sum(-1, keepdim=True) - 1
            out.append(step(model, token, position, cache, attention_bias(mask[:, :column + 1], 1, torch.float32)))
    return torch.stack(out)


@pytest.mark.parametrize("kind, kv_heads", [("qwen2", 2), ("qwen2", 4), ("qwen3", 2)])
def test_lean_decode_step_gives_the_transformers_logits_up_to_rounding(kind, kv_heads):
    model = small_model(kind, kv_heads)
    assert decode_step_for(model) is lean_decode_step, f"{kind} with SDPA must take the lean step"
    lean, reference = decode_logits(model, lean_decode_step), decode_logits(model, hf_decode_step)
    # the CPU attention is eager's arithmetic, not SDPA's kernel: as far apart as transformers' own two (~1e-7)
    difference = (lean - reference).abs().max()
    assert difference < 1e-5, f"max difference {difference:.3e} is more than float rounding"


def test_other_attention_implementations_keep_the_transformers_forward():
    assert decode_step_for(small_model("qwen2", 2, attn="eager")) is hf_decode_step, \
        "the lean step stands in for SDPA attention only, the implementation rollouts load"


def test_engine_greedy_rollouts_are_the_same_with_either_step(tokenizer):
    model = small_model("qwen2", 2)
    model.resize_token_embeddings(len(tokenizer))
    requests = [RolloutRequest(tokenizer.encode(text), 2) for text in ("Question: 1 + 2\n", "Q: 7")]
    config = SamplingConfig(max_new_tokens=12, temperature=0.0, max_tool_calls=0, ignore_eos=True)
    engine = RolloutEngine(model, tokenizer)
    lean = engine.generate(requests, config)
    engine.decode_step = hf_decode_step
    reference = engine.generate(requests, config)
    assert [r.completion_ids for r in lean] == [r.completion_ids for r in reference], "greedy tokens differ"
    for ours, theirs in zip(lean, reference):
        assert torch.allclose(torch.tensor(ours.logprobs), torch.tensor(theirs.logprobs), atol=1e-5), \
            f"recorded log-probs differ beyond rounding: {ours.logprobs} vs {theirs.logprobs}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_attention_is_sdpa_up_to_rounding(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=generator).to(dtype) for shape in
                         ((3, 2, 2, 8), (3, 2, 7, 8), (3, 2, 7, 8)))                  # [B, H_kv, G, D], [B, H_kv, K, D]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False                                                                 # a left-padded row
    bias = attention_bias(mask, 1, dtype)                                               # [B, 1, 1, K]
    ours = decode_attention(query, key, value, bias, 8 ** -0.5)
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=8 ** -0.5)
    assert ours.dtype == dtype, f"the output keeps the model's dtype, got {ours.dtype}"
    difference = (ours.float() - reference.float()).abs().max()
    assert difference < tolerance, f"max difference {difference:.3e} from SDPA is more than {dtype} rounding"
