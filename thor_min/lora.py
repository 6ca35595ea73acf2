"""LoRA written from scratch, QLoRA on bitsandbytes 4-bit linears, and the policy model's memory switches.

What it does
    `apply_lora(model, rank, alpha)` wraps the chosen linears (default: q, k, v, o, gate, up, down projections)
    in `LoRALinear`: y = base(x) + B(A(dropout(x))) * alpha / rank, with A [r, in] kaiming-uniform, B [out, r]
    zero (so the wrapped model starts equal to the base), and freezes everything else. Around it:
      merge_lora / unmerge_lora       fold W += scaling * B @ A into the base weight and back (float bases)
      disable_lora (context manager)  the base model, i.e. the reference policy, without a second copy
      lora_parameters                 what the optimiser gets
      lora_state_dict / save_lora / load_lora   adapter weights alone, as safetensors
      export_merged                   a plain transformers checkpoint (save_pretrained) with the adapters folded
                                      into dense weights, loadable by AutoModelForCausalLM, 4-bit bases included
      bnb_4bit_config / quantize_4bit / bnb_4bit_available   QLoRA: NF4 + double quantisation (models.load_model)
      enable_gradient_checkpointing   non-reentrant activation checkpointing of the decoder layers (train mode)

Design
    * LoRA weights are fp32 whatever the base dtype; the branch computes in fp32 and is cast to the base output's
      dtype. The base module stays untouched inside the wrapper, so nn.Linear and bnb Linear4bit work alike.
    * 4-bit without accelerate: transformers' own `from_pretrained(quantization_config=...)` path requires the
      `accelerate` package, so `models.load_model(load_in_4bit=True)` loads the checkpoint in the compute dtype
      and `quantize_4bit` swaps each nn.Linear (except the lm_head) for a `bnb.nn.Linear4bit` built from the
      same `BitsAndBytesConfig` fields; the weight is quantised when the module is moved to its device.
    * Export merges into a *dense* copy (dequantised for 4-bit bases) rather than re-quantising, and builds the
      output model on the meta device, so the only new memory is the merged weights.

Limits
    * merge_lora refuses 4-bit bases (re-quantising a merged NF4 weight is lossy): use export_merged, or
      `LoRALinear.merged_weight()`. A bf16 merge + unmerge round-trip is off by bf16 rounding (fp32 is ~exact),
      so do not merge/unmerge a bf16 base around every rollout: the base would drift; use the adapter path.
    * The fp32 LoRA branch saves an fp32 copy of each wrapped layer's input for backward (q, k, v each cast
      their own): ~73 KB per token per layer at Qwen2.5-1.5B sizes, on top of the base activations.
    * disable_lora refuses merged layers. Dropout is the only LoRA regulariser; no rsLoRA, DoRA or bias training.
    * Targets are matched by the last component of the module name, and only nn.Linear / Linear4bit are wrapped.
    * export_merged folds the adapters in even inside disable_lora.
"""

import contextlib
import copy
import logging
import math
import platform

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on CPU.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (checked by name, so bitsandbytes stays an optional import)."""
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def dense_weight(linear) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear, or the dequantised weight of a bnb Linear4bit."""
    if _is_4bit(linear):
        import bitsandbytes.functional as bnb_functional

        data, state = linear.weight.data, linear.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bnb repacks a CPU weight for its AVX512-BF16 kernel at the first eval-mode forward; the packed
            # layout (and its quant_state dtype) is not what dequantize_4bit reads, so unpack a copy first
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, state)
        return bnb_functional.dequantize_4bit(data, state)
    return linear.weight.detach()


class LoRALinear(nn.Module):
    """A frozen linear (nn.Linear or bnb Linear4bit) plus a trainable low-rank update B @ A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # same as nn.Linear's default init
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False inside disable_lora
        self.merged = False  # True after merge: the base weight already holds the update

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, [out, in] in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """Dense [out, in] fp32 weight equivalent to base + adapter (dequantised for a 4-bit base)."""
        base_weight = dense_weight(self.base).float()
        return base_weight if self.merged else base_weight + self.delta_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [..., out]
        if not self.enabled or self.merged:
            return out
        lora_in = self.dropout(x).to(self.lora_A.dtype)  # dropout on the LoRA branch only
        lora_out = (lora_in @ self.lora_A.T) @ self.lora_B.T  # [..., r] -> [..., out]
        return out + (lora_out * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if _is_4bit(self.base):
            raise NotImplementedError("merging into a 4-bit base would re-quantise it; use export_merged")
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False


# ----------------------------------------------------------------------------- wrapping and switching


def lora_layers(model: nn.Module) -> dict:
    """{module name: LoRALinear} in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=None) -> list:
    """Freeze `model`, wrap every target linear in LoRALinear, return the wrapped module names."""
    if lora_layers(model):
        raise ValueError("model already has LoRA layers")
    targets = tuple(targets) if targets is not None else DEFAULT_TARGETS
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child_name, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    return wrapped


def lora_parameters(model: nn.Module) -> list:
    """The trainable LoRA parameters (A and B of every layer), for the optimiser."""
    return [param for layer in lora_layers(model).values() for param in (layer.lora_A, layer.lora_B)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its (float) base weight; the forward then skips the LoRA branch."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract the adapters again (exact up to the base dtype's rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Run the base model (the reference policy) inside the block; restores each layer's state after."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged adapters: unmerge_lora first")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was_enabled in zip(layers, previous):
            layer.enabled = was_enabled


# ----------------------------------------------------------------------------- saving and loading


def lora_state_dict(model: nn.Module) -> dict:
    """{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]} (detached, on their device)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def save_lora(model: nn.Module, path) -> None:
    """Write the adapter weights alone to a .safetensors file (rank and alpha in its metadata)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("model has no LoRA layers")
    tensors = {name: tensor.contiguous().cpu() for name, tensor in lora_state_dict(model).items()}
    metadata = {"format": "pt", "rank": str(layers[0].rank), "alpha": str(layers[0].alpha)}
    save_file(tensors, str(path), metadata=metadata)


@torch.no_grad()
def load_lora(model: nn.Module, path) -> None:
    """Load adapter weights saved by save_lora into a model wrapped with the same apply_lora call."""
    loaded = load_file(str(path))
    current = lora_state_dict(model)
    missing, unexpected = sorted(set(current) - set(loaded)), sorted(set(loaded) - set(current))
    if missing or unexpected:
        raise ValueError(f"adapter keys differ: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("cannot load adapters into merged layers: unmerge_lora first")
    for name, tensor in current.items():
        if tensor.shape != loaded[name].shape:
            raise ValueError(f"{name}: saved shape {tuple(loaded[name].shape)} != {tuple(tensor.shape)}")
        tensor.copy_(loaded[name])


def _dense_state_dict(model: nn.Module) -> dict:
    """State dict under the original (un-wrapped) names, adapters folded in, 4-bit weights dequantised."""
    state, done_prefixes = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in done_prefixes):
            continue  # inside a LoRALinear or a Linear4bit already handled
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear) or _is_4bit(module):
            linear = module.base if isinstance(module, LoRALinear) else module
            weight = module.merged_weight() if isinstance(module, LoRALinear) else dense_weight(module)
            state[prefix + "weight"] = weight
            if linear.bias is not None:
                state[prefix + "bias"] = linear.bias.detach()
            done_prefixes.append(prefix)
            continue
        for param_name, param in module.named_parameters(recurse=False):
            state[prefix + param_name] = param.detach()
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name not in module._non_persistent_buffers_set:
                state[prefix + buffer_name] = buffer
    return state


@torch.no_grad()
def export_merged(model: nn.Module, path, dtype=None) -> None:
    """save_pretrained a plain model with the adapters merged (dense dtype: `dtype` or the embeddings')."""
    dtype = dtype or model.get_input_embeddings().weight.dtype
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        dense_model = type(model)(config)  # no memory: weights are assigned below
    state = {name: tensor.to(dtype) for name, tensor in _dense_state_dict(model).items()}
    dense_model.load_state_dict(state, strict=True, assign=True)
    dense_model.tie_weights()
    dense_model.save_pretrained(str(path))


# ----------------------------------------------------------------------------- 4-bit (QLoRA)


def bnb_4bit_config(compute_dtype=torch.bfloat16):
    """transformers.BitsAndBytesConfig for QLoRA: NF4, double quantisation, the given compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def bnb_4bit_available(device="cpu") -> tuple:
    """(True, "ok") if a tiny NF4 Linear4bit runs forward and backward on `device`, else (False, reason)."""
    if torch.device(device).type == "cpu" and platform.machine().lower() not in ("x86_64", "amd64", "aarch64"):
        return False, f"bitsandbytes has no CPU backend for {platform.machine()}"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)  # quantises here
        x = torch.randn(2, 16, device=device, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        if not (torch.isfinite(out).all() and torch.isfinite(x.grad).all()):
            return False, "Linear4bit produced non-finite values"
    except Exception as error:  # any failure means "not usable here"
        return False, f"{type(error).__name__}: {error}"
    return True, "ok"


def quantize_4bit(model: nn.Module, config=None, skip=("lm_head",), device=None) -> list:
    """Swap every nn.Linear not named in `skip` for a bnb Linear4bit from `config`; returns their names.

    Each weight is quantised as its module moves to `device` (default: where the weight already is).
    """
    import bitsandbytes as bnb

    config = config or bnb_4bit_config()
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in skip:
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage, device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
        )
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, quantized.to(device or module.weight.device))
        replaced.append(name)
    return replaced


# ----------------------------------------------------------------------------- activation checkpointing


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of a transformers model, non-reentrant (torch's recommended mode).

    Active only when model.training and grad mode are on: rollouts (no_grad, eval) keep their KV cache, and
    transformers drops the cache by itself in a checkpointed training forward. Non-reentrant checkpointing
    needs no input that requires grad, so frozen embeddings (LoRA) are fine: the embedding-output hook that
    transformers adds for reentrant checkpointing is removed again (it would only buy a useless input grad).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # older name, deprecated in 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
