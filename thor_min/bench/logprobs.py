"""Bench: chunked `token_logprobs` vs naive `log_softmax(h @ W.T / T).gather`, forward + backward.

Run `python -m thor_min.bench logprobs [--tokens N --hidden H --vocab V ...]`. It prints peak extra memory and
wall time of forward+backward for both paths, measured in the same process, then the two ratios
(`memory ratio (ours/naive): X`, `time ratio (ours/naive): Y`).

How memory is measured
    On CPU there is no allocator counter, so a `TorchDispatchMode` sees every aten op (forward and the autograd
    backward alike), and for each output tensor whose storage it has not seen it adds `storage.nbytes()` to a live
    counter and registers a `weakref.finalize` on the storage that subtracts it again when the storage is freed.
    The peak of that counter is the "peak extra memory": bytes of tensors created during forward+backward and
    alive at the same time, including `hidden.grad` (and `weight.grad` with --train-head). Inputs created before
    the measurement (hidden, weight) are not counted, and neither is an op output that shares a storage with one of
    the op's inputs (views, in-place results, a no-op `.to`), so every storage counts at most once.
    Allocator slack and C-level scratch buffers inside a single kernel are invisible to it. On CUDA the bench uses
    `torch.cuda.max_memory_allocated` relative to the memory allocated before the call instead.

How time is measured
    One warm-up at 64 rows, then one timed forward+backward per path (wall clock, with the tracker on; its
    per-op Python cost is microseconds against seconds of matmul). Naive runs first, then ours.

Defaults: V = 151,936 and H = 1,536 (Qwen2.5-1.5B), N = 1,024 rows, fp32, frozen head (the LoRA case),
which runs in ~20 s on 2 CPU cores. `--tokens 2048` is the issue's size (~40 s here).
"""

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from thor_min.logprobs import default_chunk_size, naive_token_logprobs, token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _storage_key(tensor):
    return tensor.untyped_storage().data_ptr()


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created under the mode and still alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen_storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_keys = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and _storage_key(item) not in input_keys:
                self._track(item.untyped_storage())
        return out

    def _track(self, storage):
        key = storage.data_ptr()
        if key in self._seen_storages or storage.nbytes() == 0:
            return  # already counted (e.g. created by an earlier op, returned again)
        self._seen_storages.add(key)
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self._seen_storages.discard(key)
        self.live_bytes -= nbytes


def measure(logprob_fn, hidden, weight, targets, temperature):
    """Returns (peak extra bytes, seconds) of one forward+backward of logprob_fn(...).sum()."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight.grad = None
    on_cuda = hidden.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    tracker = LiveTensorBytes()
    start = time.perf_counter()
    with tracker:
        logp = logprob_fn(hidden, weight, targets, temperature)  # [N]
        logp.sum().backward()
        del logp
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base_bytes if on_cuda else tracker.peak_bytes
    return peak, seconds


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m thor_min.bench logprobs", description=__doc__.split("\n")[0])
    # Problem size
    parser.add_argument("--tokens", type=int, default=1024, help="N: rows scored (completion tokens)")
    parser.add_argument("--hidden", type=int, default=1536, help="H: hidden size (Qwen2.5-1.5B: 1536)")
    parser.add_argument("--vocab", type=int, default=151936, help="V: vocabulary size (Qwen2.5: 151936)")
    # Kernel options
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the library's rule)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of hidden and weight")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature T")
    parser.add_argument("--train-head", action="store_true", help="weight requires grad (full FT, tied head)")
    # Runtime
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype)  # [V, H], init-like scale
    weight.requires_grad_(args.train_head)
    hidden = torch.randn(args.tokens, args.hidden, device=device).to(dtype)  # [N, H], final-norm-like scale
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)  # [N]
    chunk_size = args.chunk_size or default_chunk_size(args.tokens, args.vocab, device)

    def ours(h, w, y, t):
        return token_logprobs(h, w, y, temperature=t, chunk_size=chunk_size)

    for fn in (naive_token_logprobs, ours):  # warm-up: thread pools, first-call dispatch
        measure(fn, hidden[:64], weight, targets[:64], args.temperature)
    naive_peak, naive_s = measure(naive_token_logprobs, hidden, weight, targets, args.temperature)
    ours_peak, ours_s = measure(ours, hidden, weight, targets, args.temperature)

    mib = 2**20
    head = "trainable" if args.train_head else "frozen"
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} dtype={args.dtype} T={args.temperature} head={head}")
    print(f"device={device} threads={torch.get_num_threads()} chunk_size={chunk_size}")
    print(f"naive: peak extra {naive_peak / mib:9.1f} MiB   fwd+bwd {naive_s:7.3f} s")
    print(f"ours : peak extra {ours_peak / mib:9.1f} MiB   fwd+bwd {ours_s:7.3f} s")
    print(f"memory ratio (ours/naive): {ours_peak / naive_peak:.3f}")
    print(f"time ratio (ours/naive): {ours_s / naive_s:.3f}")
    return 0
