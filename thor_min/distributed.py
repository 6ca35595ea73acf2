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
Why an explicit gradient all-reduce and not DDP: DDP averages gradients and needs every rank to run the same
number of synchronised backward passes, but after the filters one rank may have more micro-batches than
another (or none in a minibatch); one all-reduce of the accumulated gradients per optimiser step is what DDP
with `no_sync()` on all but the last micro-batch would send. Limits: parameters are replicated on every rank
(LoRA and full fine-tuning alike; no FSDP sharding), gradients are reduced tensor by tensor (no buckets), and
every rank holds all rollouts of a step (they are small next to the model).
"""

import datetime
import functools
import os

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


def sum_gradients(parameters) -> None:
    """Add every trainable parameter's gradient over ranks (a rank without micro-batches sends zeros)."""
    if world_size() == 1:
        return
    for parameter in parameters:
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
    """A `RolloutEngine` whose `generate` splits the requests over ranks and returns all rollouts everywhere.

    Row (request r, sample s) draws from the stream seeded by (seed, r, s) with r the global index, so the
    rollouts equal one process's whatever the world size."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests, config, *, seed: int = 0, progress=None):
        share = shard_range(len(requests))
        local = self.engine.generate(requests[share.start:share.stop], config, seed=seed, progress=progress,
                                     first_request=share.start)
        return gather(local)
