"""Checkpoints that survive a kill: written to a temp directory, renamed into place, then pointed at.

A checkpoint holds the trainable weights (the full state dict, or only the LoRA adapters when the model
has them), the optimiser state, the python/torch RNG states, and a small JSON `state` (step, data
position, anything the trainer needs to continue). Writing order makes a SIGKILL at any moment safe:
1. everything is written into `ckpt-<step>.tmp/`;
2. the directory is renamed to `ckpt-<step>/` (atomic on one filesystem);
3. the file `latest` is replaced atomically (temp file + `os.replace`) with the new name;
4. older checkpoints are deleted (beyond `keep`), as are half-written `.tmp` dirs and later-step ones left
   by an earlier run of the same directory; never the one just written.
`load_latest` follows `latest`, so a half-written checkpoint is never read, and a run killed mid-step
loses at most the step in flight. With several ranks only rank 0 writes: the state is replicated, or (FSDP2)
gathered whole to rank 0 first. Weights and optimiser state are keyed by parameter name, so a checkpoint
resumes on any number of ranks, sharded or not.
Limits: one process writes a directory at a time; weights are saved with
`torch.save` (safetensors for adapters is `thor_min.lora.save_lora`'s job, for export).
"""

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from thor_min import distributed
from thor_min.lora import lora_layers, lora_state_dict


@dataclass
class Checkpoint:
    """What `load_latest` found: the step and the trainer's own state dict."""

    step: int
    state: dict


def _trainable_state(model) -> dict:
    return lora_state_dict(model) if lora_layers(model) else model.state_dict()


def save_checkpoint(directory: str | Path, *, model, optimizer, step: int, state: dict, keep: int = 1) -> Path:
    """Atomically write checkpoint `step` under `directory` and make it the latest. Every rank calls it: an
    FSDP2 model's weights and optimiser state are gathered whole to rank 0, which writes."""
    weights = lora_state_dict(model) if lora_layers(model) else distributed.full_weights(model)
    optimizer_state = distributed.full_optimizer_state(model, optimizer)
    return _write(Path(directory), weights, optimizer_state, step, state, keep)


@distributed.rank_zero_writes
def _write(directory: Path, weights: dict, optimizer_state: dict, step: int, state: dict, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:07d}"
    temp = directory / f"ckpt-{step:07d}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    torch.save(weights, temp / "model.pt")
    torch.save(optimizer_state, temp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, temp / "rng.pt")
    (temp / "state.json").write_text(json.dumps({"step": step, "state": state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    pointer = directory / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, directory / "latest")
    _prune(directory, final, keep)
    return final


def _prune(directory: Path, final: Path, keep: int) -> None:
    """Keep `final` and the `keep - 1` newest checkpoints before it. Later-step checkpoints (left by an earlier
    run of the same directory, unreachable now that `latest` moved back) and stale `.tmp` dirs (a killed
    write) are deleted: never the checkpoint just written."""
    older, stale = [], []
    for path in directory.glob("ckpt-*"):
        if path == final or not path.is_dir():
            continue
        (stale if path.name.endswith(".tmp") or path.name > final.name else older).append(path)
    older.sort()
    for old in stale + older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_latest(directory: str | Path, *, model, optimizer) -> Checkpoint | None:
    """Restore the latest checkpoint into `model` and `optimizer`; None if there is none."""
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    expected = _trainable_state(model)   # checked before loading: a mismatch leaves the model untouched
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong_shape = [k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(f"checkpoint {path} does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong_shape)[:3]})")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    distributed.load_full_state(model, optimizer, weights, optimizer_state)
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    saved = json.loads((path / "state.json").read_text())
    return Checkpoint(step=saved["step"], state=saved["state"])
