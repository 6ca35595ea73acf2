"""Every distributed concern of thor-min: `torchrun --nproc_per_node N train.py` runs each stage data-parallel.

Design: replicated control flow, split work. Every rank runs the same stage code on the same data (the same
problem stream, filters, batch order and step-level choices); only the expensive parts are divided:
- generation: `ShardedEngine.generate` gives each rank a contiguous share of the requests (a request is one
  prompt with its G samples, so a GRPO group never spans ranks). Rows are seeded by their GLOBAL request
  index, and the rollouts are all-gathered, so every rank then holds exactly what one process would have
  sampled: keep-filters, dynamic sampling and step-level prefixes build the same batch everywhere;
- training: each rank scores its share (`shard`) of a batch's sequences; the token-mean loss is divided by
  the batch's GLOBAL loss-token count (every rank knows it: the batch is replicated), and `sum_gradients`
  adds the gradients across ranks before the optimiser step, so all ranks take the same step and stay equal;
- writes: `rank_zero_writes` functions run on rank 0 only and then meet the other ranks at a barrier (so a
  file rank 0 wrote can be read next); `on_rank_zero` ones (log lines, metrics) skip the barrier.
One process (no torchrun) is world size 1 through the same code: the shard is everything, gather and sums
return their input unchanged, so single-process numerics are bit-identical to code without this module.
Two ways to hold the weights (`prepare_training`):
- LoRA (the presets' default): weights replicated, the adapters' gradients all-reduced by `sum_gradients` once
  per optimiser step. Why an explicit all-reduce and not DDP: DDP needs every rank to run the same number of
  synchronised backward passes, but after the filters one rank may have more micro-batches than another (or
  none in a minibatch); one all-reduce of the accumulated gradients is what DDP with `no_sync()` on all but
  the last micro-batch would send, for adapters that are a few MB.
- full fine-tuning (`--lora-rank 0`): FSDP2 (`fully_shard` per decoder layer, then the root), so parameters,
  gradients and AdamW state are split 1/N per rank. Every FSDP2 forward all-gathers a layer's weights and
  every backward reduce-scatters its gradients, collectives all ranks must join, hence `lockstep`: ranks with
  fewer micro-batches add zero-weight passes. Generation cannot be made lockstep (each rank decodes a different
  number of steps, with tool calls in between), so `gathered` unshards the whole model once for a generation
  call (`ShardedEngine.generate`) and reshards it after: during rollouts a rank holds the full weights, as
  FSDP-based RL trainers do when they hand weights to their inference engine. Checkpoints and saved models
  are the full state dict, gathered to rank 0 (`full_weights`, `full_optimizer_state`).
Limits: gradients of replicated models are reduced tensor by tensor (no buckets); every rank holds all
rollouts of a step (they are small next to the model); FSDP2 shards over one flat mesh (no hybrid sharding).
"""

import contextlib
import datetime
import functools
import os
import sys
import types

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def describe() -> dict:
    """What stages.json / summary.json record about the process group."""
    return {"world_size": world_size(), "backend": dist.get_backend() if dist.is_initialized() else "none"}


def setup(timeout_minutes: float = 30.0) -> None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); no-op alone.

    NCCL when CUDA is there (one GPU per process, chosen by LOCAL_RANK), gloo on CPU. The timeout bounds how
    long a rank waits in a collective for a rank that died, so a lost rank ends the run instead of hanging it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"   # one set of progress bars (rank 0's)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(requested: str) -> str:
    """The device for this process: with several ranks on GPUs, `auto`/`cuda` mean cuda:LOCAL_RANK."""
    if world_size() > 1 and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return requested


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Splitting and joining work


def shard(items: list) -> list:
    """This rank's share of `items` (every world_size-th, so length-sorted batches split evenly)."""
    return items if world_size() == 1 else items[rank()::world_size()]


def shard_range(count: int) -> range:
    """A contiguous share [start, stop) of `count` items (rank order = item order)."""
    size, index = world_size(), rank()
    return range(count * index // size, count * (index + 1) // size)


def gather(local: list) -> list:
    """Every rank's `local` list, concatenated in rank order, on every rank."""
    if world_size() == 1:
        return local
    parts = [None] * world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64), e.g. of loss values or token counts."""
    if world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(model) -> None:
    """Add every trainable parameter's gradient over ranks (a rank without micro-batches sends zeros).
    An FSDP2 model's backward has already summed them (reduce-scatter)."""
    if world_size() == 1 or is_sharded(model):
        return
    for parameter in model.parameters():
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)


def broadcast_parameters(model) -> None:
    """Copy rank 0's weights to every rank (e.g. randomly initialised LoRA adapters)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


# ----------------------------------------------------------------------------------------------
# Full fine-tuning: FSDP2


def prepare_training(model, shard_parameters: bool) -> None:
    """Make every rank start from rank 0's weights; with `shard_parameters` (full fine-tuning) and several ranks,
    shard the model in place with FSDP2: each decoder layer is one all-gather unit, the root holds the rest
    (embeddings, final norm, a tied head). Gradients are summed, not averaged, over ranks: each rank's loss is
    already divided by the GLOBAL token count (and gloo has no pre-multiplied sum, hence the plain-sum flag)."""
    broadcast_parameters(model)
    if world_size() == 1 or not shard_parameters:
        return
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method   # ~1 s of imports: only here

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in _sharded_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    model.run_as_forward = types.MethodType(lambda _, function, *args: function(*args), model)
    register_fsdp_forward_method(model, "run_as_forward")


def as_forward(model, function, *args):
    """`function(*args)` as if it were `model`'s forward. For an FSDP2 model that means under the root's hooks:
    the root's weights (embeddings, final norm, head) gathered before, their gradients reduce-scattered in the
    backward. Code that reads them directly, like the fused log-prob function with lm_head's weight, needs it."""
    method = getattr(model, "run_as_forward", None)
    return method(function, *args) if method is not None else function(*args)


def is_sharded(model) -> bool:
    """Whether FSDP2 shards `model` (only `prepare_training` shards, and it is what imports FSDP)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _sharded_modules(model) -> list:
    if not is_sharded(model):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """The whole of an FSDP2 model's weights on this rank for the body, with no collectives in its forwards (so
    ranks may run different numbers of them); resharded on exit. Does nothing to any other model."""
    modules = _sharded_modules(model)
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def lockstep(model, groups: list[list[int]], spare: list[int]) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches as (indices, real). For an FSDP2 model every rank must make the same number of
    forward/backward passes, so a rank with fewer appends (spare, False): passes whose loss it multiplies by 0."""
    passes = [(group, True) for group in groups]
    if not is_sharded(model):
        return passes
    most = max(gather([len(groups)]))
    return passes + [(spare, False)] * (most - len(groups))


def full_weights(model) -> dict:
    """The model's state dict with whole tensors. FSDP2: gathered, a collective every rank joins; rank 0 gets
    the dict, the others an empty one (only rank 0 writes)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimiser's state keyed by parameter name (not position), with whole tensors (gathered as above):
    the same form for a replicated and a sharded model, so a checkpoint resumes on any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load what `full_weights`/`full_optimizer_state` returned (read from a checkpoint on every rank); with
    FSDP2 each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if is_sharded(model):
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(weights, strict=False)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------
# Only rank 0 writes


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_rank_zero(function):
    """Run `function` on rank 0 only (others get None); for output nobody reads back (log lines, metrics)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs) if rank() == 0 else None
    return wrapper


def rank_zero_writes(function):
    """Run `function` on rank 0 only, then wait for all ranks: after the call its files exist for everyone.
    Every rank must make the call (control flow is replicated, so they do)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs) if rank() == 0 else None
        barrier()
        return result
    return wrapper


class RankZeroOnly:
    """Wraps an object (the metrics log) so that its methods run on rank 0 and do nothing elsewhere."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        attribute = getattr(self.target, name)
        return on_rank_zero(attribute) if callable(attribute) else attribute


# ----------------------------------------------------------------------------------------------
# Sharded generation


class ShardedEngine:
    """A `RolloutEngine` whose `generate` splits the requests over ranks and returns all rollouts everywhere
    (an FSDP2 model is `gathered` for the call).

    Row (request r, sample s) draws from the stream seeded by (seed, r, s) with r the global index, so the
    rollouts equal one process's whatever the world size."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests, config, *, seed: int = 0, progress=None):
        share = shard_range(len(requests))
        with gathered(self.engine.model):
            local = self.engine.generate(requests[share.start:share.stop], config, seed=seed, progress=progress,
                                         first_request=share.start)
        return gather(local)
