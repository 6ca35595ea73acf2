"""Tests for thor_min.lora: LoRA, QLoRA on bitsandbytes 4-bit, export, checkpointing. Run: pytest tests/test_lora.py

The 4-bit tests run for real on CPU (bitsandbytes 0.50 has a CPU backend) and skip, with the probe's reason,
where a tiny Linear4bit cannot run.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from thor_min import lora
from thor_min.models import load_model

VOCAB = 300
NUM_LAYERS = 2


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).to(dtype).eval()


def input_ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))  # [B, T]


def randomise_adapters(model, seed=2, std=0.1):
    """Give B non-zero values so that the adapters change the output (B = 0 at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


def lora_model(seed=0, rank=4, alpha=8.0, **kwargs):
    model = tiny_model(seed)
    lora.apply_lora(model, rank, alpha, **kwargs)
    return model


# ----------------------------------------------------------------------------- wrapping


def test_apply_lora_wraps_all_seven_projections_per_layer():
    names = lora.apply_lora(tiny_model(), rank=4, alpha=8)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    assert len(names) == 7 * NUM_LAYERS, f"expected 14 wrapped linears, got {names}"
    assert suffixes == sorted(lora.DEFAULT_TARGETS), f"wrapped suffixes {suffixes}"


def test_only_lora_parameters_are_trainable():
    model = lora_model()
    trainable = {id(param) for param in model.parameters() if param.requires_grad}
    assert trainable == {id(param) for param in lora.lora_parameters(model)}, "base weights must be frozen"


def test_custom_targets_and_missing_targets():
    names = lora.apply_lora(tiny_model(), rank=2, alpha=2, targets=["q_proj", "v_proj"])
    assert len(names) == 2 * NUM_LAYERS, f"only q and v should be wrapped, got {names}"
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(tiny_model(), rank=2, alpha=2, targets=["nonexistent"])


def test_init_a_kaiming_b_zero_and_scaling():
    layer = lora.LoRALinear(torch.nn.Linear(64, 32), rank=8, alpha=16)
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 64
    assert torch.all(layer.lora_B == 0), "B must start at zero"
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4, "A must be kaiming-uniform"
    assert layer.scaling == 2.0, f"scaling must be alpha / rank = 2, got {layer.scaling}"


def test_lora_linear_output_formula():
    layer = lora.LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=2)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    expected = layer.base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * 0.5
    torch.testing.assert_close(layer(x), expected, msg="y = base(x) + B A x * alpha / r")


def test_fresh_adapters_leave_the_output_unchanged():
    base = tiny_model()
    wrapped = copy.deepcopy(base)
    lora.apply_lora(wrapped, rank=4, alpha=8)
    assert torch.equal(wrapped(input_ids()).logits, base(input_ids()).logits), "B = 0 must give the base output"


def test_step_zero_gradients_a_zero_b_nonzero():
    model = lora_model()
    model(input_ids()).logits.logsumexp(-1).mean().backward()
    for name, layer in lora.lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_A.grad) == 0, f"{name}: A.grad must be exactly 0 while B = 0"
        assert torch.count_nonzero(layer.lora_B.grad) > 0, f"{name}: B.grad must be non-zero"


def test_after_one_step_a_gets_gradient_too():
    model = lora_model()
    optimizer = torch.optim.SGD(lora.lora_parameters(model), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids()).logits.logsumexp(-1).mean().backward()
        optimizer.step()
    layer = next(iter(lora.lora_layers(model).values()))
    assert torch.count_nonzero(layer.lora_A.grad) > 0, "once B != 0, A must receive a gradient"


def test_dropout_acts_on_the_lora_branch_only():
    layer = lora.LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5).train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 16)
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.equal(first, layer(x)), "train-mode dropout must make the LoRA branch stochastic"
    with lora.disable_lora(layer):
        assert torch.equal(layer(x), layer.base(x)), "dropout must not touch the base path"


# ----------------------------------------------------------------------------- disable, merge, unmerge


def test_disable_lora_gives_the_base_model_and_restores():
    base = tiny_model()
    model = copy.deepcopy(base)
    lora.apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    adapted = model(input_ids()).logits
    with lora.disable_lora(model):
        assert torch.equal(model(input_ids()).logits, base(input_ids()).logits), "disabled != base model"
    assert torch.equal(model(input_ids()).logits, adapted), "adapters not restored after the block"
    assert not torch.allclose(adapted, base(input_ids()).logits), "fixture check: adapters must change the output"


def test_merge_equals_adapter_path_fp32():
    model = lora_model()
    randomise_adapters(model)
    adapted = model(input_ids()).logits
    lora.merge_lora(model)
    torch.testing.assert_close(model(input_ids()).logits, adapted, rtol=1e-5, atol=2e-6, msg="merged != adapter")


def test_unmerge_restores_base_weights():
    model = lora_model()
    before = {name: layer.base.weight.clone() for name, layer in lora.lora_layers(model).items()}
    randomise_adapters(model)
    lora.merge_lora(model)
    lora.unmerge_lora(model)
    for name, layer in lora.lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, before[name], rtol=0, atol=1e-6, msg=f"{name} not restored")


def test_merge_bf16_is_close_to_adapter_path():
    model = tiny_model(dtype=torch.bfloat16)
    lora.apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    adapted = model(input_ids()).logits.float()
    lora.merge_lora(model)
    merged = model(input_ids()).logits.float()
    error = (merged - adapted).abs().max().item()
    assert error < 0.05 * adapted.abs().max().item(), f"bf16 merge off by {error}"


def test_disable_refuses_merged_layers():
    model = lora_model()
    lora.merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora.disable_lora(model):
            pass


# ----------------------------------------------------------------------------- saving and export


def test_save_and_load_adapters_round_trip(tmp_path):
    source = lora_model(seed=0)
    randomise_adapters(source, seed=5)
    lora.save_lora(source, tmp_path / "adapter.safetensors")
    target = lora_model(seed=0)  # same base, fresh adapters
    torch.manual_seed(123)
    lora.load_lora(target, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(target(input_ids()).logits, source(input_ids()).logits, msg="loaded adapters differ")


def test_saved_file_holds_adapters_only(tmp_path):
    from safetensors import safe_open

    model = lora_model()
    lora.save_lora(model, tmp_path / "adapter.safetensors")
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(key.endswith((".lora_A", ".lora_B")) for key in keys), f"non-adapter keys: {keys[:4]}"
    assert len(keys) == 2 * 7 * NUM_LAYERS, f"expected A and B for 14 layers, got {len(keys)}"
    assert metadata["rank"] == "4" and float(metadata["alpha"]) == 8.0, f"metadata {metadata}"


def test_load_lora_rejects_other_targets(tmp_path):
    lora.save_lora(lora_model(targets=["q_proj"]), tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="adapter keys differ"):
        lora.load_lora(lora_model(), tmp_path / "adapter.safetensors")


def test_export_merged_reloads_with_plain_transformers(tmp_path):
    model = lora_model()
    randomise_adapters(model)
    lora.export_merged(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(
        reloaded(input_ids()).logits, model(input_ids()).logits, rtol=1e-5, atol=2e-6, msg="exported logits differ"
    )
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight, "tied head lost in export"
    assert not lora.lora_layers(reloaded), "exported model must be a plain transformers model"


# ----------------------------------------------------------------------------- gradient checkpointing


def count_calls(module):
    """Counts forward entries (a pre-hook: non-reentrant recompute stops early, before post-hooks fire)."""
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_gradient_checkpointing_recomputes_and_keeps_gradients():
    grads, calls = [], []
    for checkpointing in (False, True):
        model = lora_model()
        randomise_adapters(model)
        if checkpointing:
            lora.enable_gradient_checkpointing(model)
        model.train()
        layer_calls = count_calls(model.model.layers[0].mlp)
        model(input_ids()).logits.logsumexp(-1).mean().backward()
        grads.append(torch.cat([param.grad.flatten() for param in lora.lora_parameters(model)]))
        calls.append(len(layer_calls))
    assert calls == [1, 2], f"the checkpointed layer must run again in backward, calls {calls}"
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7, msg="checkpointing changed the grads")


def test_gradient_checkpointing_keeps_the_kv_cache_for_rollouts():
    model = lora_model()
    lora.enable_gradient_checkpointing(model)
    with torch.no_grad():
        out = model(input_ids(), use_cache=True)
    assert out.cache is not None and out.cache.get_seq_length() == 7, "no_grad rollouts must keep their KV cache"


def test_gradient_checkpointing_with_frozen_embeddings_needs_no_input_grad():
    model = lora_model()
    lora.enable_gradient_checkpointing(model)
    model.train()
    embeddings = model.model.embed_tokens(input_ids())
    model(input_ids()).logits.logsumexp(-1).mean().backward()
    assert not embeddings.requires_grad, "the embedding output should not be forced to require grad"
    assert all(param.grad is not None for param in lora.lora_parameters(model)), "LoRA grads missing"


# ----------------------------------------------------------------------------- 4-bit (QLoRA)


@pytest.fixture(scope="module")
def bnb_ok():
    ok, reason = lora.bnb_4bit_available()
    if not ok:
        pytest.skip(f"bitsandbytes 4-bit unusable here: {reason}")


@pytest.fixture
def checkpoint_dir(tmp_path, tokenizer):
    tiny_model().save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    return tmp_path / "base"


def load_4bit(path, compute_dtype):
    """The product's 4-bit path: models.load_model(..., load_in_4bit=True) on the CPU."""
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[compute_dtype]
    return load_model(str(path), device="cpu", dtype=dtype, load_in_4bit=True)[0]


def test_bnb_4bit_config_is_nf4_double_quant():
    config = lora.bnb_4bit_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4", "must be NF4 4-bit"
    assert config.bnb_4bit_use_double_quant, "must use double quantisation"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16, "compute dtype not passed through"


def test_load_in_4bit_quantises_the_projections_only(bnb_ok, checkpoint_dir):
    model = load_4bit(checkpoint_dir, torch.float32)
    quantized = [name for name, module in model.named_modules() if lora._is_4bit(module)]
    assert len(quantized) == 7 * NUM_LAYERS, f"expected 14 Linear4bit, got {quantized}"
    assert not lora._is_4bit(model.lm_head), "the tied lm_head must stay dense"
    assert model.lm_head.weight is model.model.embed_tokens.weight, "4-bit loading broke the tied head"


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_backward_reaches_lora_only(bnb_ok, checkpoint_dir, compute_dtype):
    model = load_4bit(checkpoint_dir, compute_dtype)
    lora.apply_lora(model, rank=4, alpha=8)
    logits = model(input_ids()).logits
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all(), "4-bit forward produced non-finite logits"
    layers = lora.lora_layers(model).values()
    assert all(lora._is_4bit(layer.base) for layer in layers), "LoRA must wrap the Linear4bit modules"
    assert all(torch.count_nonzero(layer.lora_B.grad) > 0 for layer in layers), "B.grad must be non-zero"
    trainable = {id(param) for param in model.parameters() if param.requires_grad}
    assert trainable == {id(param) for param in lora.lora_parameters(model)}, "4-bit base weights must be frozen"


def test_qlora_training_steps_reduce_the_loss(bnb_ok, checkpoint_dir):
    model = load_4bit(checkpoint_dir, torch.float32)
    lora.apply_lora(model, rank=4, alpha=8)
    optimizer = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    ids = input_ids()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"5 AdamW steps on one batch must lower the loss, got {losses}"


@pytest.mark.parametrize("compute_dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_qlora_export_matches_adapter_path(bnb_ok, checkpoint_dir, tmp_path, compute_dtype, tolerance):
    model = load_4bit(checkpoint_dir, compute_dtype).train()   # train mode: bnb's exact dequantising path
    lora.apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    adapted = model(input_ids()).logits.float()
    lora.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    error = (reloaded(input_ids()).logits - adapted).abs().max().item()
    # fp32 compute uses the dequantised weight exactly; bf16 compute rounds activations
    assert error <= tolerance * max(1.0, adapted.abs().max().item()), f"merged dense vs 4-bit adapter path: {error}"


def test_dense_weight_survives_bnb_cpu_repacking(bnb_ok, checkpoint_dir):
    model = load_4bit(checkpoint_dir, torch.float32)          # eval mode, as for rollouts
    linear = model.model.layers[0].self_attn.q_proj
    before = lora.dense_weight(linear).clone()
    with torch.no_grad():
        model(input_ids())          # on AVX512-BF16 CPUs bnb repacks the weight here (bf16 block scales)
    error = (lora.dense_weight(linear).float() - before).abs().max().item()
    assert error <= 0.01 * before.abs().max().item(), f"dequantised weight changed by {error} after a forward"


def test_merge_lora_refuses_4bit_base(bnb_ok, checkpoint_dir):
    model = load_4bit(checkpoint_dir, torch.float32)
    lora.apply_lora(model, rank=4, alpha=8)
    with pytest.raises(NotImplementedError, match="export_merged"):
        lora.merge_lora(model)


def test_rl_starts_from_the_cold_start_policy_on_the_4bit_path(bnb_ok, checkpoint_dir, tmp_path):
    """SFT ends on NF4 base + adapter; RL must start from that policy, not from a re-quantised merge."""
    from thor_min.config import override, preset_for
    from thor_min.run_context import Run, load_policy, save_policy

    preset = override(preset_for("tiny"), load_in_4bit=True, lora_rank=4, lora_alpha=8.0)
    run = Run(preset=preset, out=tmp_path / "run", device="cpu")
    cold_start, tokenizer = load_policy(run, str(checkpoint_dir), trainable=True)
    base_logits = cold_start.train()(input_ids()).logits.detach()   # train mode: bnb's exact dequantising path
    randomise_adapters(cold_start, std=0.02)   # an SFT-sized delta, far below the NF4 level spacing
    expected = cold_start(input_ids()).logits.detach()
    save_policy(run, cold_start, tokenizer, "sft")
    rl_start, _ = load_policy(run, str(run.model_dir("sft")), trainable=True)
    got = rl_start.train()(input_ids()).logits.detach()
    sft_effect = (expected - base_logits).abs().max().item()
    error = (got - expected).abs().max().item()
    assert sft_effect > 1e-3, f"the test's adapter must change the policy (changed it by {sft_effect})"
    assert error <= 1e-3 * sft_effect, \
        f"RL's initial policy differs from the cold start by {error} (the SFT update moved logits by {sft_effect})"
