"""The run a stage belongs to (`Run`), and the helpers every stage shares: loading and saving policies, the
sandbox, prompts, training and evaluation problems, and the stage record in OUT/stages.json.

Design: a stage is a function of a `Run` (thor_min.pipeline, thor_min.ablation); what one stage hands the next is
a directory under OUT (a model, a JSONL file), never an object in memory, so any stage can run alone or in a
process of its own. Limits: one OUT directory per run; only rank 0 writes under torchrun (thor_min.distributed).
"""

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from thor_min import distributed, side_by_side, tasks
from thor_min.config import Preset
from thor_min.data import Problem, load_problems
from thor_min.metrics import MetricsLog
from thor_min.models import (detect_template, encode_prompt, load_model, load_tokenizer, read_metadata, save_model_dir,
                             write_metadata)
from thor_min.sandbox import Sandbox
from thor_min.trackers import open_trackers

ADAPTER_FILE = "adapter.safetensors"   # a 4-bit stage's LoRA adapter, beside its merged weights


@dataclass
class Run:
    """Everything a stage needs to know about this run."""

    preset: Preset
    out: Path
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    ablation: bool = False
    report_to: tuple[str, ...] = ()   # experiment trackers besides metrics.jsonl (thor_min.trackers)
    random_init: bool = False         # base model and LLM critic: real architecture, random weights (rehearsal)
    log: MetricsLog = field(init=False)

    def __post_init__(self):
        self.out = Path(self.out)
        self.device = distributed.device(self.device)
        settings = {**asdict(self.preset), "seed": self.seed, "device": self.device, "ablation": self.ablation}
        trackers = distributed.on_rank_zero(open_trackers)(self.report_to, self.out, self.out.name, settings)
        self.log = distributed.RankZeroOnly(MetricsLog(self.out, trackers=trackers))

    @property
    def is_tiny(self) -> bool:
        return self.preset.model == "tiny"

    def model_dir(self, name: str) -> Path:
        return self.out / name

    def finished(self, name: str) -> bool:
        return (self.model_dir(name) / "config.json").is_file()

    def base_model(self) -> str:
        if not self.is_tiny:
            return self.preset.model
        if not self.finished("base"):
            raise SystemExit(f"error: no tiny base model in {self.model_dir('base')}: run --stage pretrain first")
        return str(self.model_dir("base"))

    def template(self, tokenizer=None) -> str:
        return self.preset.template if self.preset.template != "auto" else detect_template(self.base_model(), tokenizer)


@distributed.on_rank_zero
def say(message: str) -> None:
    """One clear log line per stage event (progress bars handle the rest)."""
    print(f"[thor-min {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def training_problems(run: Run, count: int, salt: int) -> list[Problem]:
    """Problems for TIRGen (salt 0) and RL (salt 1): tiny-world train split, or the preset's dataset.
    (The pretraining corpus, salt 2, follows the pretraining seed: see stage_pretrain.)"""
    if run.is_tiny:
        return tasks.train_split(count, seed=run.seed * 10 + salt + tasks.DEFAULT_SEED)
    problems = load_problems(run.preset.train_data)
    return problems[:count] if salt == 0 else problems[-count:] if count < len(problems) else problems


def load_policy(run: Run, name: str, trainable: bool):
    """Load a stage's model; for training, wrap LoRA adapters and enable checkpointing per the preset.

    The 4-bit hand-off: a stage trained on an NF4 base leaves its adapter beside the merged weights
    (`save_policy`). Training on from it re-loads the same NF4 base and that adapter, so the next stage starts
    from exactly the policy the last one ended with; re-quantising the merged weights instead would round away
    a LoRA delta far below the NF4 level spacing and start RL from the base, not from the cold start."""
    from thor_min.lora import apply_lora, load_lora

    preset = run.preset
    adapter = read_metadata(name).get("adapter") if trainable and preset.load_in_4bit else None
    location = read_metadata(name)["base"] if adapter else name
    model, tokenizer = load_model(location, device=run.device, load_in_4bit=preset.load_in_4bit and trainable,
                                  gradient_checkpointing=preset.gradient_checkpointing and trainable,
                                  random_init=run.random_init and location == preset.model)
    if adapter:
        apply_lora(model, adapter["rank"], adapter["alpha"])
        load_lora(model, Path(name) / adapter["file"])
        tokenizer = load_tokenizer(name)
    elif trainable and preset.lora_rank > 0:
        apply_lora(model, preset.lora_rank, preset.lora_alpha)
    # every rank starts from rank 0's weights (LoRA init is random); full fine-tuning on several ranks: FSDP2
    distributed.prepare_training(model, shard_parameters=trainable and not adapter and preset.lora_rank == 0)
    return model, tokenizer


def save_policy(run: Run, model, tokenizer, name: str) -> Path:
    """Write a loadable model directory atomically (LoRA adapters merged into a dense copy). Every rank calls
    it: an FSDP2 model's weights are gathered to rank 0 first, and rank 0 writes."""
    weights = distributed.full_weights(model) if distributed.is_sharded(model) else None
    return _write_policy(run, model, tokenizer, name, weights)


@distributed.rank_zero_writes
def _write_policy(run: Run, model, tokenizer, name: str, weights: dict | None) -> Path:
    from thor_min.lora import export_merged, lora_layers, save_lora

    target, temp = run.model_dir(name), run.model_dir(name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    if lora_layers(model):
        export_merged(model, temp)
        tokenizer.save_pretrained(temp)
        facts = {}
        if run.preset.load_in_4bit:   # keep NF4 base + adapter for the next stage (see load_policy)
            save_lora(model, temp / ADAPTER_FILE)
            layer = next(iter(lora_layers(model).values()))
            facts = {"base": model.name_or_path,   # the NF4 base this model was loaded from
                     "adapter": {"file": ADAPTER_FILE, "rank": layer.rank, "alpha": layer.alpha}}
        write_metadata(temp, run.template(tokenizer), **facts)
    else:
        save_model_dir(model, tokenizer, temp, run.template(tokenizer), state_dict=weights)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temp, target)
    return target


# ----------------------------------------------------------------------------------------------
# Jobs side by side (thor_min.side_by_side): RL variants, eval rows, TIRGen rounds


def jobs_at_once(run: Run, count: int) -> int:
    """How many of `count` independent jobs (shares of TIRGen rounds, RL variants, evaluation rows) run at once,
    each in its own process: the preset's `side_by_side` (1 = one after the other); never under torchrun (the
    ranks already share the work), and on a CPU never more than its cores hold at `cpu_threads` threads each."""
    if count <= 1 or distributed.world_size() > 1:
        return 1
    at_once = min(run.preset.side_by_side, count)
    if run.device == "cpu":
        threads = run.preset.cpu_threads
        at_once = min(at_once, (os.cpu_count() or 1) // threads if threads > 0 else 1)
    return max(at_once, 1)


def run_settings(run: Run) -> dict:
    """What a process of its own needs to rebuild `run` (its log stays with the parent)."""
    return {"preset": run.preset, "out": run.out, "seed": run.seed, "device": run.device, "resume": run.resume,
            "ablation": run.ablation, "random_init": run.random_init}


def side_by_side_or_exit(jobs: list, run: Run, at_once: int) -> dict:
    try:
        return side_by_side.run_side_by_side(jobs, run.log, at_once=at_once, threads=run.preset.cpu_threads)
    except RuntimeError as error:
        raise SystemExit(f"error: {error} (the traceback is above; --resume continues the finished parts)")


def make_sandbox(run: Run) -> Sandbox:
    return Sandbox(workers=run.preset.sandbox_workers, timeout=run.preset.cell_timeout)


def prompt_encoder(run: Run, tokenizer, tools: bool):
    template = run.template(tokenizer)
    return lambda problem: encode_prompt(tokenizer, template, problem.question, tools=tools)


@distributed.rank_zero_writes
def record_stage(run: Run, stage: str, seconds: float, **facts) -> None:
    """Append a stage's wall time, facts and process group to OUT/stages.json (the report sums the seconds)."""
    path = run.out / "stages.json"
    stages = json.loads(path.read_text()) if path.exists() else {}
    stages[stage] = {"seconds": round(seconds, 1), **facts, **distributed.describe()}
    path.write_text(json.dumps(stages, indent=2) + "\n")



def eval_problems(run: Run) -> dict[str, list[Problem]]:
    """The evaluation sets: the tiny world's test split and held-out templates, or the preset's benchmarks."""
    limit = run.preset.eval_problems
    return {name: load_problems(name, limit=limit) for name in run.preset.benchmarks}



@distributed.rank_zero_writes
def write_lines(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)

